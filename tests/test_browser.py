"""A real browser drives 00_explore in JupyterLab: run all cells, move the keep_ratio slider, and
check that the displayed PPL changes and that the highlighted tokens match the ratio.

Needs Debian's Chromium (/usr/bin/chromium; `.ci/run` installs it) and the playwright package;
JupyterLab runs headless on loopback only. The screenshot goes to build/screenshots/explore.png, the
measured latencies to build/screenshots/explore_latency.json (the committed screenshot and its latencies:
figures/explore.png and data/results/00_explore/browser.json, copied from there).
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
    # the lab serves the committed notebooks: without this, a run that stays dirty past the autosave
    # interval (a slow or failing one) writes its outputs into notebooks/00_explore.ipynb
    docmanager = settings / "@jupyterlab" / "docmanager-extension"
    docmanager.mkdir(parents=True)
    (docmanager / "plugin.jupyterlab-settings").write_text('{"autosave": false}')
    committed = {nb: nb.read_bytes() for nb in (ROOT / "notebooks").glob("*.ipynb")}
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
    assert {nb: nb.read_bytes() for nb in committed} == committed, "the browser session changed a committed notebook"


# In-page instrumentation: each key press on the slider records its time, and a mutation
# observer the moment #metrics shows another n_kept: the latency is what a user sees.
_MOVE_PROBE = """() => {
  window.__moves = [];
  const nKept = () => { const e = document.querySelector('#metrics .n-kept'); return e ? e.textContent : null; };
  document.addEventListener('keydown', () => window.__moves.push({start: performance.now(), before: nKept()}), true);
  new MutationObserver(() => {
    const m = window.__moves[window.__moves.length - 1];
    if (m && m.done === undefined && nKept() !== null && nKept() !== m.before) m.done = performance.now();
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_explorer_slider_in_real_browser(jupyterlab):
    """Run all cells; once the default policy's grid is filled, move the keep_ratio slider with the
    keyboard over >= 10 grid points and time each move to the metrics on screen; time the
    continuation's arrival; drag the slider and count the metric updates seen during the drag;
    compare two policies; screenshot the explorer with the curve and the compare view; prefill a text
    of one's own and time the click to its first grid point on screen."""
    import json
    import statistics

    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install chromium"
    shots = ROOT / "build" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(f"{jupyterlab}/lab/tree/00_explore.ipynb")
        page.locator(".jp-NotebookPanel").first.wait_for(timeout=120_000)
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=120_000)
        page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\| Idle")).first.wait_for(timeout=120_000)
        ppl = page.locator("#metrics .ppl").first
        for attempt in range(2):  # a click that lands before the kernel is connected runs nothing: retry once
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            try:
                ppl.wait_for(timeout=120_000)
                break
            except Exception:
                if attempt == 1:
                    raise
        status = page.locator("#status")
        status.filter(has_text=re.compile(r"grid 20/20 for knorm")).wait_for(timeout=300_000)
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=300_000)
        kept = lambda: page.locator("span.kept").count()
        context = kept() + page.locator("span.evicted").count()
        assert kept() == kl.n_kept_for(context, 0.5)
        assert page.locator(".quality-curve polyline").count() >= 2   # PPL and KL, at least knorm's

        # keyboard moves: every one lands on a computed grid point
        page.evaluate(_MOVE_PROBE)
        handle = page.locator(".widget-slider", has=page.locator("label", has_text="keep_ratio")).locator(".noUi-handle")
        handle.focus()
        latencies = []
        for i in range(12):
            page.keyboard.press("ArrowLeft" if i < 6 else "ArrowRight")
            page.wait_for_function("() => window.__moves.length && window.__moves[window.__moves.length - 1].done",
                                   timeout=30_000)
        moves = page.evaluate("() => window.__moves")
        latencies = [m["done"] - m["start"] for m in moves]
        assert len(latencies) >= 10
        assert kept() == kl.n_kept_for(context, 0.5)   # 6 steps down and 6 up: back at 0.5

        # a setting not visited yet: its continuation is generated in the worker and shown when
        # ready, without another move (the metrics were there at once)
        t0 = time.perf_counter()
        handle.focus()
        page.keyboard.press("ArrowRight")
        page.locator("#continuation", has_text="generating the continuation").wait_for(timeout=30_000)
        page.locator("#continuation", has_text="generated in").wait_for(timeout=120_000)
        continuation_s = time.perf_counter() - t0
        assert kept() == kl.n_kept_for(context, 0.55)

        # a drag across the slider: the metrics follow the hand
        box = handle.bounding_box()
        page.evaluate("() => { window.__seen = new Set(); new MutationObserver(() => { const e = "
                      "document.querySelector('#metrics .n-kept'); if (e) window.__seen.add(e.textContent); })"
                      ".observe(document.body, {subtree: true, childList: true, characterData: true}); }")
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        for dx in range(1, 11):
            page.mouse.move(box["x"] + box["width"] / 2 + 12 * dx, box["y"] + box["height"] / 2, steps=2)
            page.wait_for_timeout(120)
        page.mouse.up()
        page.wait_for_timeout(500)
        seen_during_drag = page.evaluate("() => window.__seen.size")
        assert seen_during_drag >= 3   # the metrics changed while the handle moved, not only on release

        # two policies compared, at keep_ratio 0.5 (the drag may have ended at 1.0, where both keep all)
        handle.focus()
        for _ in range(20):
            page.keyboard.press("ArrowLeft")
        for _ in range(9):
            page.keyboard.press("ArrowRight")
        page.wait_for_function("n => { const e = document.querySelector('#metrics .n-kept'); "
                               "return e && e.textContent === String(n); }", arg=kl.n_kept_for(context, 0.5),
                               timeout=60_000)
        compare = page.locator(".widget-dropdown", has=page.locator("label", has_text="compare with")).locator("select")
        compare.select_option("random")
        page.locator(".legend", has_text="only random").wait_for(timeout=120_000)
        page.locator("#metrics .metrics-row", has_text="random").locator(".ppl").wait_for(timeout=120_000)
        assert page.locator("span.only-a").count() + page.locator("span.only-b").count() > 0
        explorer_ui = page.locator(".widget-vbox", has=page.locator("#metrics")).first
        explorer_ui.scroll_into_view_if_needed()
        explorer_ui.screenshot(path=str(shots / "explore.png"))

        # a text of one's own, three times: "prefill this text", then the first grid point on screen,
        # timed in the page from the click event to the first PPL other than the old text's (the
        # prefill, the first point and both round trips)
        textarea = explorer_ui.locator("textarea").first
        original = textarea.input_value()
        page.evaluate("() => { window.__ppl = () => { const e = document.querySelector('#metrics .ppl'); "
                      "return e ? e.textContent : null; }; window.__paste = {}; "
                      "document.addEventListener('click', e => { const b = e.target.closest('button'); "
                      "if (b && b.textContent.includes('prefill this text')) window.__paste.click = performance.now(); }, true); "
                      "new MutationObserver(() => { const p = window.__paste; if (p.click && !p.first && "
                      "window.__ppl() !== null && window.__ppl() !== p.before) p.first = performance.now(); })"
                      ".observe(document.body, {subtree: true, childList: true, characterData: true}); }")
        own_text = []
        for opening in ("A text of my own, pasted in. ", "Another one. ", "And a third text, my own. "):
            textarea.fill(opening + original)
            page.evaluate("() => { window.__paste = {before: window.__ppl()}; }")
            explorer_ui.locator("button", has_text="prefill this text").click()
            page.wait_for_function("() => window.__paste.first", timeout=120_000)
            paste = page.evaluate("() => window.__paste")
            prefilled = re.search(r"prefilled (\d+) tokens in ([\d.]+) s", status.inner_text())
            assert prefilled and int(prefilled.group(1)) == context   # the same 384-token context, a new text
            own_text.append({"prefill_s": float(prefilled.group(2)),
                             "click_to_first_point_s": (paste["first"] - paste["click"]) / 1e3})
            page.wait_for_timeout(3000)   # the worker fills on meanwhile, as it would while one reads

        # another model from the menu: the embedded Gemma 3 270M (one KV head, local and global
        # layers, QK-norm), loaded once in this kernel, the same text prefilled again
        menu = lambda name: page.locator(".widget-dropdown", has=page.locator("label", has_text=re.compile(
            rf"^{name}$"))).locator("select")
        page.evaluate("() => { window.__paste = {before: window.__ppl()}; }")
        t0 = time.perf_counter()
        menu("model").select_option(label="gemma-3-270m (embedded)")
        page.wait_for_function("() => window.__ppl() !== null && window.__ppl() !== window.__paste.before",
                               timeout=300_000)
        switch_s = time.perf_counter() - t0
        page.locator("#status", has_text="prefilled").wait_for(timeout=60_000)
        layer_kind = page.locator("#layer-kind").inner_text()
        assert re.search(r"layer \d+: (local \(sliding window 512\)|global \(full attention\))", layer_kind)
        assert "knorm_prenorm" in menu("policy").inner_text()   # QK-norm: the key before the norm is offered
        assert page.locator("span.kept").count() > 0
        explorer_ui.screenshot(path=str(shots / "explore_gemma.png"))
        browser.close()
    numbers = {"slider_to_metrics_s": {"median": statistics.median(latencies) / 1e3, "min": min(latencies) / 1e3,
                                       "max": max(latencies) / 1e3, "n": len(latencies)},
               "continuation_arrival_s": continuation_s, "metric_values_seen_during_drag": seen_during_drag,
               "own_text": {"context_tokens": context, "runs": own_text},
               "model_switch_s": {"to": "gemma-3-270m", "menu_to_first_point_s": switch_s, "layer_kind": layer_kind}}
    from knorm_study import runtime

    numbers.update(machine=runtime.machine_info(), recorded_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (shots / "explore_latency.json").write_text(json.dumps(numbers) + "\n")
    print(json.dumps(numbers))
