"""Running engines: typed manifests, the backends table, runners, loading engines and checking them
against this machine, the tokenizers. Imports neither torch nor onnx (tests/test_layout.py checks it):
every served model loads through here."""
