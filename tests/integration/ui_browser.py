"""Drives the Airflow 3.3 UI in Debian's Chromium (``/usr/bin/chromium``) with Playwright.

Helpers for the UI tests, run against a live api-server: log in through the simple auth manager's page,
read the run states the grid and the Runs tab show, open the gate's verdict where an operator reads it
(the DAG run's note, the task's XCom view, the asset's events) and return the text that is on the page.
Chromium comes from ``scripts/install_system_packages.sh``; Playwright never downloads a browser here.

The pages and selectors (Airflow 3.3's React UI; ``DAG``/``RUN``/``TASK`` are ids):

================================  ==========================================================================
``/auth/login?next=...``          ``input[name=username]``, ``input[name=password]``, ``button[type=submit]``
``/dags/DAG``                     the grid: one bar per run, ``[data-run-id=RUN] a[href="/dags/DAG/runs/RUN/"]``;
                                  hovering it shows a tooltip ``Run ID: RUN`` / ``State: Failed``; its data
                                  comes from ``GET /ui/grid/runs/DAG``; cells ``[data-testid=grid-RUN-TASK]``
``/dags/DAG/runs``                the Runs tab: ``table[data-testid=table-list]`` with the columns ``Dag Run ID`` and ``State``
``/dags/DAG/runs/RUN``            the run's header ``h2`` RUN + ``[data-testid=state-badge]``; its note
                                  (first paragraph only) beside
                                  ``button[aria-label="Edit note"]``, which opens the ``Dag Run Note`` dialog
                                  with the whole note rendered as markdown
``/dags/DAG/runs/RUN/tasks/TASK/xcom``  Storage > XCom: rows ``[data-testid=table-cell-key]`` and
                                  ``[data-testid=xcom-value]``
``/assets``                       the assets list (a link per asset name) -> ``/assets/ID``: its events,
                                  ``[data-testid=card-list] > div``, each with a source link to the run and
                                  its extra in a folded JSON editor (``.codicon-folding-collapsed`` unfolds)
================================  ==========================================================================
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

CHROMIUM = "/usr/bin/chromium"
# Flags that work on these machines as root (no sandbox, no GPU, nothing fetched in the background).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT_DIR = PROJECT_ROOT / "reports" / "ui"
TIMEOUT_MS = 60_000  # generous: the 2-core machines are shared, and the UI is one big bundle


class UIError(AssertionError):
    """The page did not show what the helper looked for (the message says what it showed instead)."""


@contextlib.contextmanager
def open_browser(viewport: tuple[int, int] = (1400, 900), timeout_ms: int = TIMEOUT_MS) -> Iterator:
    """Debian's Chromium, headless, with a fresh user-data dir; yields a Playwright ``Page``.

    Everything (browser, profile folder) is closed and removed on exit.
    """
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run scripts/install_system_packages.sh")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="sum-ui-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": viewport[0], "height": viewport[1]},
            )
            try:
                context.set_default_timeout(timeout_ms)
                page = context.pages[0] if context.pages else context.new_page()
                yield page
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path


def navigate(page, base_url: str, path: str, quiet_ms: int = 500) -> None:
    """Goes to ``path`` of the UI and waits until the page's fetches are done.

    Inside the running app (same origin, past the login page) this is a client-side navigation, as a
    click on a link does (history entry + ``popstate`` for the app's router): it spares re-loading the
    UI's bundle for every page. Else a full page load.
    """
    target = _url(base_url, path)
    origin = _url(base_url, "")
    in_app = page.url.startswith(origin + "/") and not is_login_page(page) \
        and page.locator("[data-testid=nav-sidebar]").count() > 0
    with _quiet_network(page, quiet_ms):
        if in_app:
            page.evaluate("p => { window.history.pushState({}, '', p); "
                          "window.dispatchEvent(new PopStateEvent('popstate', {state: {}})); }", path)
            page.wait_for_url(target)
        else:
            page.goto(target)


@contextlib.contextmanager
def _quiet_network(page, quiet_ms: int, timeout_ms: int = TIMEOUT_MS) -> Iterator[None]:
    """On exit, waits until no fetch/XHR of the page has been in flight for ``quiet_ms``."""
    inflight: set = set()
    last_change = [time.monotonic()]

    def started(request) -> None:
        if request.resource_type in ("fetch", "xhr"):
            inflight.add(request)
            last_change[0] = time.monotonic()

    def ended(request) -> None:
        if request in inflight:
            inflight.discard(request)
            last_change[0] = time.monotonic()

    page.on("request", started)
    page.on("requestfinished", ended)
    page.on("requestfailed", ended)
    try:
        yield
        deadline = time.monotonic() + timeout_ms / 1000
        page.wait_for_timeout(100)  # let the router render and start its fetches
        while time.monotonic() < deadline:
            if not inflight and time.monotonic() - last_change[0] >= quiet_ms / 1000:
                break
            page.wait_for_timeout(50)
    finally:
        page.remove_listener("request", started)
        page.remove_listener("requestfinished", ended)
        page.remove_listener("requestfailed", ended)


def _q(value: str) -> str:
    return quote(value, safe="")


def is_login_page(page) -> bool:
    return "/auth/login" in page.url and page.locator("input[name=password]").count() > 0


def login(page, base_url: str, username: str, password: str, next_path: str = "/",
          login_timeout_ms: int = 15_000) -> None:
    """Signs in on the simple auth manager's page (``/auth/login``) and waits for the app to load.

    Raises:
        UIError: the page still shows the login form (wrong credentials) or the app did not load.
    """
    page.goto(_url(base_url, f"/auth/login?next={_q(next_path)}"))
    page.locator("input[name=username]").fill(username)
    page.locator("input[name=password]").fill(password)
    page.locator("button[type=submit]").click()
    refused = page.get_by_text(re.compile(r"Invalid credentials|401 Unauthorized"))
    deadline = time.monotonic() + login_timeout_ms / 1000
    while "/auth/login" in page.url and time.monotonic() < deadline:
        if refused.count():
            raise UIError(f"login as {username!r} refused; the page shows: {_body_text(page)[:300]!r}")
        page.wait_for_timeout(100)
    try:
        page.locator("[data-testid=nav-sidebar]").wait_for()
    except Exception as err:  # playwright's TimeoutError
        raise UIError(f"login as {username!r} failed; the page shows: {_body_text(page)[:500]!r}") from err
    if not any(c["name"] == "_token" for c in page.context.cookies()):
        raise UIError("logged in, but no _token cookie was set")


def _body_text(page) -> str:
    try:
        return page.locator("body").inner_text(timeout=2_000)
    except Exception:
        return ""


def open_dag_grid(page, base_url: str, dag_id: str) -> list[str]:
    """Opens the DAG's page and waits until its grid shows the runs the page fetched for it
    (``GET /ui/grid/runs/DAG``).

    Returns:
        The run ids with a bar in the grid, in the grid's order (left to right).
    """
    fetched: list[list[dict]] = []

    def on_response(response) -> None:
        if f"/ui/grid/runs/{dag_id}?" in response.url and response.ok:
            try:
                body = response.json()
            except Exception:
                return
            fetched.append(body.get("dag_runs", []) if isinstance(body, dict) else body)

    page.on("response", on_response)
    try:
        navigate(page, base_url, f"/dags/{_q(dag_id)}")
        page.locator("[data-testid=nav-sidebar]").wait_for()
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while not fetched and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        if not fetched:
            raise UIError(f"the page of {dag_id} fetched no grid runs; it shows: {_body_text(page)[:500]!r}")
        page.wait_for_load_state("networkidle")
    finally:
        page.remove_listener("response", on_response)
    expected = max(fetched, key=len)
    if expected:
        _grid_bar(page, dag_id, expected[0]["run_id"]).wait_for()
    prefix = f"/dags/{_q(dag_id)}/runs/"
    hrefs = page.locator(f'[data-run-id] a[href^="{prefix}"]').evaluate_all("els => els.map(e => e.getAttribute('href'))")
    return [h[len(prefix):-1] for h in hrefs if h.endswith("/") and "/" not in h[len(prefix):-1]]


def _grid_bar(page, dag_id: str, run_id: str):
    # The UI writes the run id into the link as it is ("backfill__2026-01-02T00:00:00+00:00") or
    # percent-encoded, depending on the id's characters: match either.
    hrefs = {f"/dags/{_q(dag_id)}/runs/{rid}/" for rid in (_q(run_id), run_id)}
    return page.locator(", ".join(f'a[href="{h}"]' for h in sorted(hrefs))).first


def run_states(page, base_url: str, dag_id: str, run_ids: list[str] | None = None,
               source: str = "grid", screenshot_prefix: str | None = None) -> dict[str, str]:
    """The state of each run as the page shows it, lower case (``success``, ``failed``, ``running``, ...).

    Args:
        run_ids: The runs to read (default: every run the page lists).
        source: ``grid`` - hover each run's bar in the DAG's grid and read its tooltip (``State: ...``);
            ``runs`` - the ``State`` column of the DAG's Runs tab.
        screenshot_prefix: saves ``reports/ui/<prefix>-<run_id>.png`` with each run's tooltip shown
            (grid), or ``<prefix>.png`` of the table (runs).

    Raises:
        UIError: a run is not on the page, or shows no state.
    """
    if source == "grid":
        return _grid_states(page, base_url, dag_id, run_ids, screenshot_prefix)
    if source == "runs":
        states = _runs_tab_states(page, base_url, dag_id, run_ids)
        if screenshot_prefix:
            screenshot(page, f"{screenshot_prefix}.png")
        return states
    raise ValueError(f"unknown source {source!r} (grid or runs)")


def _grid_states(page, base_url: str, dag_id: str, run_ids: list[str] | None,
                 screenshot_prefix: str | None) -> dict[str, str]:
    shown = open_dag_grid(page, base_url, dag_id)
    wanted = run_ids if run_ids is not None else shown
    missing = [r for r in wanted if r not in shown]
    if missing:
        raise UIError(f"runs {missing} have no bar in the grid of {dag_id} (shown: {shown})")
    states = {}
    for run_id in wanted:
        _grid_bar(page, dag_id, run_id).hover()
        tooltip = page.get_by_text(f"Run ID: {run_id}", exact=False).last
        tooltip.wait_for()
        text = tooltip.inner_text()
        match = re.search(r"State:\s*(\w+)", text)
        if not match:
            raise UIError(f"the tooltip of run {run_id!r} shows no state: {text!r}")
        states[run_id] = match.group(1).lower()
        if screenshot_prefix:
            screenshot(page, f"{screenshot_prefix}-{run_id}.png")
        page.mouse.move(0, 0)  # close the tooltip before hovering the next bar
        tooltip.wait_for(state="hidden")
    return states


def _runs_tab_states(page, base_url: str, dag_id: str, run_ids: list[str] | None) -> dict[str, str]:
    navigate(page, base_url, f"/dags/{_q(dag_id)}/runs")
    table = page.locator("table[data-testid=table-list]").first
    table.locator("tbody tr").first.wait_for()
    headers = [h.strip() for h in table.locator("thead th").all_inner_texts()]
    try:
        id_col, state_col = headers.index("Dag Run ID"), headers.index("State")
    except ValueError as err:
        raise UIError(f"the Runs tab has no 'Dag Run ID'/'State' columns: {headers}") from err
    shown = {}
    for row in table.locator("tbody tr").all():
        cells = row.locator("td").all_inner_texts()
        if len(cells) > max(id_col, state_col):
            shown[cells[id_col].strip()] = cells[state_col].strip().lower()
    wanted = run_ids if run_ids is not None else list(shown)
    missing = [r for r in wanted if r not in shown]
    if missing:
        raise UIError(f"runs {missing} are not in the Runs tab of {dag_id} (shown: {sorted(shown)})")
    return {r: shown[r] for r in wanted}


def open_run(page, base_url: str, dag_id: str, run_id: str) -> str:
    """Opens the DAG run's page and returns the state its header shows (lower case)."""
    navigate(page, base_url, f"/dags/{_q(dag_id)}/runs/{_q(run_id)}")
    header = page.locator("h2").filter(has_text=re.compile(rf"^{re.escape(run_id)}$")).first
    header.wait_for()
    page.locator('button[aria-label="Edit note"]').first.wait_for()
    badge = header.locator("xpath=following-sibling::*[@data-testid='state-badge'][1]")
    badge.wait_for()
    return badge.inner_text().strip().lower()


def open_run_note(page, base_url: str, dag_id: str, run_id: str, opened: bool = False) -> str:
    """The DAG run's note as its page shows it: the ``Dag Run Note`` dialog (opened with the note's button;
    the header shows only the first paragraph) with the markdown rendered. Empty if the run has no note.
    The dialog is left open (for a screenshot); :func:`close_dialog` closes it.

    Args:
        opened: the run's page is open already (:func:`open_run`).
    """
    if not opened:
        open_run(page, base_url, dag_id, run_id)
    page.locator('button[aria-label="Edit note"]').first.click()
    dialog = page.locator("[role=dialog]", has=page.locator("h2", has_text="Note")).first
    dialog.wait_for()
    body = dialog.locator(".chakra-dialog__body")
    text = body.inner_text() if body.count() else dialog.inner_text()
    if dialog.locator("textarea").count():  # no note yet: the dialog opens in edit mode
        return dialog.locator("textarea").first.input_value()
    return re.sub(r"\n?\s*Edit\s*$", "", text).strip()


def close_dialog(page) -> None:
    page.keyboard.press("Escape")
    page.locator("[role=dialog]").first.wait_for(state="hidden")


def open_task_xcom(page, base_url: str, dag_id: str, run_id: str, task_id: str,
                   key: str | None = None) -> dict[str, str]:
    """Opens the task instance's XCom view (Storage > XCom) and returns ``{key: value as shown}``
    (only ``key`` when given; waits for it to be listed).

    Raises:
        UIError: ``key`` is not listed.
    """
    navigate(page, base_url, f"/dags/{_q(dag_id)}/runs/{_q(run_id)}/tasks/{_q(task_id)}/xcom")
    keys = page.locator("[data-testid=table-cell-key]")
    try:
        (keys.filter(has_text=re.compile(rf"^{re.escape(key)}$")) if key else keys).first.wait_for()
    except Exception as err:
        raise UIError(f"XCom {key!r} of {dag_id}/{run_id}/{task_id} is not listed; the page shows: "
                      f"{_body_text(page)[-800:]!r}") from err
    shown = {}
    for row in page.locator("tbody tr").all():
        k = row.locator("[data-testid=table-cell-key]")
        if not k.count() or (key and k.first.inner_text().strip() != key):
            continue
        value = row.locator("[data-testid=xcom-value]").first
        if not value.count():  # JSON values are shown in a collapsible viewer, not as text
            value = row.locator("[data-testid=table-cell-Value]").first
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while not (text := value.inner_text().strip()) and time.monotonic() < deadline:
            page.wait_for_timeout(200)  # each value is fetched on its own after the list
        shown[k.first.inner_text().strip()] = re.sub(r"\s*Copy$", "", text)
    return shown


def open_asset_events(page, base_url: str, asset_name: str) -> list[dict]:
    """Opens the asset's page from the assets list and returns its events as shown, newest first:
    ``{"run_id": the source run (from the event's source link) or None, "text": the card's text with its
    extra unfolded}``."""
    navigate(page, base_url, "/assets")
    link = page.get_by_role("link", name=asset_name, exact=True).first
    link.wait_for()
    with _quiet_network(page, 500):
        link.click()
        page.wait_for_url(re.compile(r"/assets/\d+"))
    page.get_by_role("heading", name=asset_name).first.wait_for()
    page.get_by_text("Producing Tasks").first.wait_for()
    cards = page.locator("[data-testid=card-list] > div")
    page.get_by_text(re.compile(r"\d+ Asset Events?")).first.wait_for()
    events = []
    for card in cards.all():
        # the extra is a folded JSON editor (Monaco): unfold it, as a reader would, to see the values
        if card.locator(".monaco-editor").count():
            fold = card.locator(".codicon-folding-collapsed, .codicon-folding-expanded").first
            try:  # the editor adds its folding controls once it has laid the JSON out; `{}` gets none
                fold.wait_for(state="attached", timeout=10_000)
            except Exception:
                pass
            if card.locator(".codicon-folding-collapsed").count():
                card.locator(".codicon-folding-collapsed").first.click()
                card.locator(".codicon-folding-expanded").first.wait_for(state="attached")
                page.wait_for_timeout(300)  # the editor lays the unfolded lines out
        source = card.locator('a[href*="/runs/"]')
        href = source.first.get_attribute("href") if source.count() else None
        match = re.search(r"/runs/([^/]+)", href or "")
        events.append({"run_id": match.group(1) if match else None,
                       "text": card.inner_text().replace("\u00a0", " ")})
    return events


def open_verdict(page, base_url: str, dag_id: str, run_id: str, task_id: str = "shift_gate",
                 xcom_key: str = "verdict_table", asset_name: str | None = None,
                 screenshot_prefix: str | None = None) -> dict[str, str]:
    """Opens every place the gate's verdict is shown for one run and returns the visible text of each:
    ``run_state`` (the state badge in the run's header), ``note`` (the DAG run's note dialog), ``xcom`` (the task's ``xcom_key`` in its XCom view) and, with
    ``asset_name``, ``asset_event`` (the text of the asset's newest event from this run, "" if none). With ``screenshot_prefix``, saves
    ``reports/ui/<prefix>-note.png``, ``-xcom.png`` (and ``-asset.png``)."""
    shown = {"run_state": open_run(page, base_url, dag_id, run_id)}
    shown["note"] = open_run_note(page, base_url, dag_id, run_id, opened=True)
    if screenshot_prefix:
        screenshot(page, f"{screenshot_prefix}-note.png")
    close_dialog(page)
    shown["xcom"] = open_task_xcom(page, base_url, dag_id, run_id, task_id, xcom_key)[xcom_key]
    if screenshot_prefix:
        screenshot(page, f"{screenshot_prefix}-xcom.png")
    if asset_name:
        events = [e for e in open_asset_events(page, base_url, asset_name) if e["run_id"] == run_id]
        shown["asset_event"] = events[0]["text"] if events else ""
        if screenshot_prefix:
            screenshot(page, f"{screenshot_prefix}-asset.png")
    return shown


def screenshot(page, path: str | Path, full_page: bool = False) -> Path:
    """Saves a PNG of the page; a relative ``path`` is under ``reports/ui/`` of the project."""
    path = Path(path)
    if not path.is_absolute():
        path = SCREENSHOT_DIR / path
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=full_page)
    return path


def markdown_words(markdown: str) -> list[str]:
    """The words a reader sees of a markdown text (table pipes and rules, emphasis, headings dropped), for
    comparing a note or an XCom with the page however the page lays it out (rendered or raw)."""
    words = re.sub(r"[|*_`#>]", " ", markdown).split()
    # table rules, and list markers (a rendered list shows bullets, not "-")
    return [w for w in words if not re.fullmatch(r":?-{3,}:?|-", w)]


def shows_text(displayed: str, expected_markdown: str) -> bool:
    """Whether ``displayed`` shows the words of ``expected_markdown`` together and in order
    (see :func:`markdown_words`)."""
    needle, hay = markdown_words(expected_markdown), markdown_words(displayed)
    return bool(needle) and any(hay[i:i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))
