"""Take the README's screenshots of the playground and the run report from a real run (needs `make browser`).

    lorakit demo --out runs/demo
    python scripts/screenshots.py runs/demo          # writes docs/playground*.png and docs/report*.png

The run's adapter is served next to the embedded base (`lorakit serve --base smollm2`) from a scratch adapter
directory; the playground asks both one held-out question that the adapter answers and the base does not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser import CHROMIUM_FLAGS, LAPTOP, PHONE, chromium_path  # noqa: E402  (the browser tests' settings)


def pick_question(run: Path) -> str:
    rows = json.loads((run / "eval.json").read_text())["rows"]
    wins = [r for r in rows if r.get("tuned_correct") and not r.get("base_correct")]
    return (wins or rows)[0]["query"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished `lorakit demo` (or train + eval --json) folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go (default docs/)")
    parser.add_argument("--name", default="support", help="the adapter's name in the playground")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from lorakit.adapter_folder import CONFIG_NAME, WEIGHTS_NAME
    from lorakit.report import write_report
    from lorakit.serve import ServerThread, add_serve_arguments, build_server

    args.out.mkdir(parents=True, exist_ok=True)
    report = write_report(args.run)
    question = pick_question(args.run)
    with tempfile.TemporaryDirectory() as scratch, sync_playwright() as playwright:
        adapters = Path(scratch) / "adapters"
        (adapters / args.name).mkdir(parents=True)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copy(args.run / name, adapters / args.name / name)
        serve_parser = argparse.ArgumentParser()
        add_serve_arguments(serve_parser)
        server = ServerThread(build_server(serve_parser.parse_args(
            ["--base", "smollm2", "--adapter-dir", str(adapters), "--max-model-len", "1024"]))).start()
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=LAPTOP)
            page.goto(server.url + "/playground")
            page.locator(f'#models li[data-model="{args.name}"]').wait_for()
            for box in page.locator("#models input[type=checkbox]").all():
                box.set_checked(True)
            page.fill("#prompt", question)
            page.fill("#max_tokens", str(args.max_tokens))
            page.click("#ask")
            page.wait_for_function("!document.querySelector('#answers [data-state=streaming]')", timeout=600_000)
            page.evaluate("document.activeElement.blur()")
            page.screenshot(path=str(args.out / "playground.png"))
            page.set_viewport_size(PHONE)
            page.locator("#answers").scroll_into_view_if_needed()
            page.screenshot(path=str(args.out / "playground-phone.png"))

            page = browser.new_page(viewport=LAPTOP)
            page.goto(report.resolve().as_uri())
            page.screenshot(path=str(args.out / "report.png"))
            page.click('button[data-filter="fixed"]')
            page.locator("#questions").scroll_into_view_if_needed()
            page.evaluate("document.getElementById('questions').scrollIntoView()")
            page.screenshot(path=str(args.out / "report-answers.png"))
        finally:
            browser.close()
            server.stop()
    print(f"screenshots in {args.out}: playground.png, playground-phone.png, report.png, report-answers.png")


if __name__ == "__main__":
    main()
