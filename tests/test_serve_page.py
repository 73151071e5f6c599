"""The status page in a real browser: Debian's headless Chromium driven by Selenium, against
a live `executor serve` while a worker drains a job. scripts/ensure-browser (run by
`make test`) installs chromium and chromium-driver when they are missing.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.helpers import run_cli, start_cli
from tests.test_serve import Server

ROOT = Path(__file__).resolve().parent.parent
SHOT = ROOT / "out" / "status-page.png"


def browser() -> webdriver.Chrome:
    driver_path = shutil.which("chromedriver")
    binary = shutil.which("chromium")
    assert driver_path and binary, "chromium and chromedriver: run scripts/ensure-browser"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000",
                "--disable-dev-shm-usage"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)


def text(driver: webdriver.Chrome, selector: str) -> str:
    """The text of the first element `selector` finds, read in one step inside the page: page.js
    replaces the tables every 2 s, so an element found first and read after may be gone."""
    found = driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null", selector
    )
    assert found is not None, f"nothing matches {selector}"
    return found


def progress(driver: webdriver.Chrome) -> str:
    return text(driver, "#jobs tr[data-job] .count")


@pytest.fixture
def job(tmp_path: Path, db_path: Path, tiny_model: Path) -> int:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"item {i}"}) + "\n" for i in range(40)))
    out = run_cli("submit", str(prompts), "--model", str(tiny_model), "--name", "nightly",
                  db_path=db_path, check=True)  # fmt: skip
    return int(out.stdout)


def test_the_page_shows_progress_moving_without_console_errors(db_path, job, tmp_path):
    server = Server(db_path)
    card = json.dumps([{"name": "NVIDIA RTX 3060", "uuid": "GPU-fake-0", "total": 12 * 2**30,
                        "watts": 170}])  # fmt: skip
    env = {"EXECUTOR_ENGINE": "fake", "EXECUTOR_FAKE_TOKEN_SECONDS": "0.15",
           "EXECUTOR_PARALLEL": "2", "EXECUTOR_FAKE_NVML": card,
           # As a Slurm array task: the page says which one (its end time an hour away).
           "SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3",
           "SLURM_JOB_END_TIME": str(int(time.time()) + 3600)}  # fmt: skip
    worker = start_cli("run", "--until-empty", db_path=db_path, env=env)
    driver = browser()
    try:
        driver.get(server.url + "/")
        assert driver.title == "executor"
        assert "nightly" in text(driver, "#jobs")
        first = progress(driver)
        deadline = time.monotonic() + 60
        while progress(driver) == first:  # page.js refreshes every 2 s
            assert time.monotonic() < deadline, f"progress stayed {first!r}"
            time.sleep(0.5)
        assert "live" in text(driver, "#workers")
        assert "slurm job 4242_3" in text(driver, "#workers")
        assert "updated" in text(driver, "#updated")
        assert driver.find_elements(By.CSS_SELECTOR, "#vram svg.vram rect")
        assert driver.find_elements(By.CSS_SELECTOR, "#loads tbody tr")
        worker.communicate(timeout=120)
        deadline = time.monotonic() + 30
        while "40 done" not in progress(driver):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert driver.find_elements(By.CSS_SELECTOR, "#jobs svg.spark polyline")
        SHOT.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(SHOT))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()
        if worker.poll() is None:
            worker.terminate()
        server.stop()
