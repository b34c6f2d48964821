"""The page's screenshot in docs: the trained shapes model served with a cache, a few captions
stored, a caption half typed, and one Generate.

    .venv/bin/python scripts/ui_screenshot.py --engines engines/demo --out docs/figures/ui_page_shapes.png
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from voltacache.benchmark import free_port
from voltacache.cache.layers import CacheSettings
from voltacache.serving.client import Client
from voltacache.serving.deploy import deploy
from voltacache.serving.server import TritonServer
from voltacache.ui.app import make_app

CAPTIONS = [
    "a red circle on a blue background",
    "a red square on a yellow background",
    "a green triangle on a white background",
    "a red circle on a black background",
    "a blue circle on a yellow background",
    "a purple square on a green background",
]
REQUEST = dict(steps=20, guidance=5.0, scheduler="ddim", cache_interval=3)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory() as tmp:
        settings = CacheSettings(index=str(Path(tmp) / "cache.db"), embedder="minilm")
        repo = deploy(args.engines, Path(tmp) / "repo", cache=settings)
        ports = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
        with TritonServer(repo, **ports) as server:
            client = Client(server.grpc_url)
            for i, caption in enumerate(CAPTIONS):
                client.generate(caption, seed=i, **REQUEST)
            port = free_port()
            page = uvicorn.Server(uvicorn.Config(make_app(client), host="127.0.0.1", port=port, log_level="warning"))
            threading.Thread(target=page.run, daemon=True).start()
            while not page.started:
                time.sleep(0.05)
            options = webdriver.ChromeOptions()
            options.binary_location = "/usr/bin/chromium"
            for flag in (
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--window-size=1000,1300",
                f"--user-data-dir={tmp}/chromium",
            ):
                options.add_argument(flag)
            browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
            try:
                browser.get(f"http://127.0.0.1:{port}")
                time.sleep(2)
                browser.find_element(By.ID, "prompt").send_keys("a red circle on a")
                time.sleep(2)
                browser.find_element(By.CSS_SELECTOR, "#recommendations li").click()
                time.sleep(2)
                browser.find_element(By.CSS_SELECTOR, "#gallery figure").click()
                browser.find_element(By.ID, "generate").click()
                time.sleep(3)
                browser.save_screenshot(str(args.out))
            finally:
                browser.quit()
                page.should_exit = True
    print(args.out)


if __name__ == "__main__":
    main()
