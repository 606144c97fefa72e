"""The HTML viewer in a real browser: headless Chromium (Debian ``chromium``) loads the page from
disk, runs its script, shows every node and edge, fills the details panel on hover, and renders a
hostile ``<script>`` label as text. A screenshot is left in the test artifacts folder
(``$CC_TEST_ARTIFACTS`` or ``test-artifacts/`` at the repository root).

``scripts/test.sh`` installs Chromium; where it is missing these tests are skipped with a reason."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest

from graphs.circuit import Circuit
from graphs.render import render_html
from tests.test_render import make_circuit

ROOT = Path(__file__).resolve().parents[1]
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium (apt-get install chromium)")

HOSTILE = '<script>alert("pwned")</script> & "quotes"'

# Hover every item of the page's data in turn and record what the details panel then says.
_DRIVER = """
(function () {
  var items = JSON.parse(document.getElementById("cc-data").textContent).items;
  var out = [];
  Object.keys(items).forEach(function (id) {
    var el = document.getElementById(id);
    if (!el) { out.push(id + "\\tMISSING"); return; }
    el.dispatchEvent(new MouseEvent("mouseenter"));
    var hot = el.classList.contains("cc-hot") ? "HOT" : "COLD";
    out.push(id + "\\t" + hot + "\\t" + document.getElementById("cc-details").textContent);
  });
  var pre = document.createElement("pre");
  pre.id = "cc-test-result";
  pre.textContent = out.join("\\n");
  document.body.appendChild(pre);
})();
""".strip()


def _sha(code: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(code.encode()).digest()).decode() + "'"


def _with_driver(page: str) -> str:
    """The page plus the driver script, allowed by adding its hash to the page's own CSP (the
    viewer script keeps running under the page's policy, unchanged)."""
    page = page.replace("script-src ", f"script-src {_sha(_DRIVER)} ", 1)
    return page.replace("</body>", f"<script>{_DRIVER}</script>\n</body>", 1)


def _chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert BROWSER is not None
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--disable-extensions", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def _artifacts() -> Path:
    folder = Path(os.environ.get("CC_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def circuit() -> Circuit:
    return make_circuit(provenance={"model": HOSTILE, "task": "ioi"})


def test_viewer_shows_every_node_and_edge_and_hover_details(circuit: Circuit, tmp_path: Path) -> None:
    path = tmp_path / "viewer.html"
    path.write_text(_with_driver(render_html(circuit, title=HOSTILE)), encoding="utf-8")
    run = _chromium("--dump-dom", path.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Uncaught" not in run.stderr and "Content Security Policy" not in run.stderr, run.stderr[-2000:]
    dom = run.stdout
    found = re.search(r'<pre id="cc-test-result">(.*?)</pre>', dom, re.S)
    assert found, "the driver script did not run"
    lines = [line.split("\t") for line in unescape(found.group(1)).splitlines()]
    by_id = {fields[0]: fields[1:] for fields in lines}
    n_nodes, n_edges = len(circuit.nodes()), len(circuit.edges())
    assert len(by_id) == n_nodes + n_edges  # one hover target per drawn node and edge
    for element, fields in by_id.items():
        assert fields[0] == "HOT", (element, fields)  # present in the SVG and highlighted on hover
    details = [fields[1] for fields in by_id.values()]
    for node in circuit.nodes():
        assert any(d.startswith(f"node{node}kind") for d in details), node
    for edge in circuit.edges():
        assert any(d.startswith(f"edge{edge}from") for d in details), edge
    # the hostile label is text: escaped in the DOM, and no script element carries it
    assert "&lt;script&gt;alert(" in dom
    assert 'alert("pwned")' not in re.sub(r"&lt;script&gt;alert\(&quot;pwned&quot;\)|&lt;script&gt;alert\(\"pwned\"\)", "", dom)


def test_viewer_screenshot(circuit: Circuit, tmp_path: Path) -> None:
    path = tmp_path / "viewer.html"
    path.write_text(render_html(circuit, title=HOSTILE), encoding="utf-8")
    shot = _artifacts() / "html-viewer.png"
    shot.unlink(missing_ok=True)
    run = _chromium(f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars", path.as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000  # a real picture, not an empty page
