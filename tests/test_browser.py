"""A real browser drives 00_explore in JupyterLab: run all cells, move the keep_ratio slider, and
check that the displayed PPL changes and that the highlighted tokens match the ratio.

Needs Debian's Chromium (/usr/bin/chromium; `.ci/run` installs it) and the playwright package;
JupyterLab runs headless on loopback only. The screenshot goes to build/screenshots/explore.png.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import knorm_lib as kl

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    port = _free_port()
    settings = tmp_path_factory.mktemp("settings")
    news = settings / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               JUPYTER_RUNTIME_DIR=str(tmp_path_factory.mktemp("runtime")), JUPYTERLAB_SETTINGS_DIR=str(settings),
               KNORM_RESULTS_DIR=str(tmp_path_factory.mktemp("results")))  # the committed results stay untouched
    log = (tmp_path_factory.mktemp("lab") / "lab.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                             f"--ServerApp.port={port}", "--IdentityProvider.token=", "--ServerApp.password=",
                             "--allow-root", "--ServerApp.terminals_enabled=False",
                             f"--ServerApp.root_dir={ROOT / 'notebooks'}", "--LabApp.news_url=",
                             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited early; see {log.name}")
            time.sleep(0.5)
    else:
        raise RuntimeError(f"JupyterLab did not answer on {url}; see {log.name}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_explorer_slider_in_real_browser(jupyterlab):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install chromium"
    shots = ROOT / "build" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"{jupyterlab}/lab/tree/00_explore.ipynb")
        page.locator(".jp-NotebookPanel").first.wait_for(timeout=120_000)
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=120_000)
        page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\| Idle")).first.wait_for(timeout=120_000)
        ppl = page.locator("#metrics .ppl")
        for attempt in range(2):  # a click that lands before the kernel is connected runs nothing: retry once
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            try:
                ppl.wait_for(timeout=90_000)
                break
            except Exception:
                if attempt == 1:
                    raise
        status = page.locator("#status")
        status.wait_for(timeout=300_000)
        before = ppl.inner_text()
        kept_before = page.locator("span.kept").count()
        context = page.locator("span.kept").count() + page.locator("span.evicted").count()
        assert kept_before == kl.n_kept_for(context, 0.5)

        readout = page.locator(".widget-slider", has=page.locator("label", has_text="keep_ratio")).locator(".widget-readout")
        readout.click()
        page.keyboard.press("Control+a")
        page.keyboard.type("0.25")
        page.keyboard.press("Enter")
        page.wait_for_function("before => { const e = document.querySelector('#metrics .ppl');"
                               " return e && e.textContent !== before; }", arg=before, timeout=120_000)
        page.wait_for_function("() => !!document.querySelector('#status')", timeout=60_000)
        after = ppl.inner_text()
        assert after != before
        assert page.locator("span.kept").count() == kl.n_kept_for(context, 0.25)
        seconds = float(re.search(r"([\d.]+) s", status.inner_text()).group(1))
        (shots / "update_seconds.txt").write_text(f"{seconds}\n")
        assert page.locator(".norm-strip").count() == 1
        explorer_ui = page.locator(".widget-vbox", has=page.locator("#metrics")).first
        explorer_ui.scroll_into_view_if_needed()
        explorer_ui.screenshot(path=str(shots / "explore.png"))
        browser.close()
