"""`voltacache ui`: a web page over a served deployment (the dream cacher's user side)."""
