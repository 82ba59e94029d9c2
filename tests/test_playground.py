"""The playground in headless Chromium against `lorakit serve` on loopback (a tiny base, adapters on disk, an API
key): models picked, one question asked, answers streamed side by side and equal to the API's own; log-probability
shading; the adapter list with rank, targets, size and status; load/unload; errors shown in the page; phone width."""

from __future__ import annotations

import argparse
import math

import httpx
import pytest

from browser import LAPTOP, PHONE, artifact_dir, browser, png_size  # noqa: F401 (browser: a fixture)
from lorakit.adapter_folder import human_bytes
from lorakit.serve import ServerThread, add_serve_arguments, build_server
from test_serve_helpers import save_base, save_random_adapter, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

KEY = "playground-key"
BASE = "tiny-base"
QUESTION = "Where do I find my invoices?"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    tok = tiny_tokenizer()
    base = tiny_model(tok)
    save_base(base, tok, root / "base")
    adapters = root / "adapters"
    save_random_adapter(base, adapters / "billing", seed=1, r=8)
    save_random_adapter(base, adapters / "support", seed=2, r=4, alpha=8.0, targets=["q_proj", "v_proj"])
    save_random_adapter(tiny_model(tok, hidden=32), adapters / "otherbase", seed=3)  # made for another base
    damaged = save_random_adapter(base, adapters / "damaged", seed=4)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--base", str(root / "base"), "--served-model-name", BASE, "--adapter-dir",
                              str(adapters), "--max-adapters", "3", "--max-batch-size", "4", "--max-model-len", "256",
                              "--api-key", KEY])
    running = ServerThread(build_server(args)).start()
    http = httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    yield {"url": running.url, "http": http}
    http.close()
    running.stop()


@pytest.fixture(scope="module")
def page(browser, server):  # noqa: F811
    """One browser tab for the module: the tests below run in order, as one session of a user."""
    tab = browser.new_page(viewport=LAPTOP)
    tab.set_default_timeout(30_000)
    tab.errors = []
    tab.on("pageerror", lambda e: tab.errors.append(str(e)))
    yield tab
    assert tab.errors == []
    tab.close()


def api_answer(server, model: str) -> dict:
    """The same greedy request the page sends, made through the API: its text and its tokens' log probabilities."""
    r = server["http"].post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
        "max_tokens": MAX_TOKENS, "logprobs": True, "top_logprobs": 3})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def model_row(page, name: str):
    return page.locator(f'#models li[data-model="{name}"]')


def shaded_spans(answer) -> list[list[str]]:
    """[text, log probability, background colour, tooltip] of each shaded token of an answer, in one call."""
    return answer.locator("span[data-logprob]").evaluate_all(
        "spans => spans.map(s => [s.textContent, s.dataset.logprob, getComputedStyle(s).backgroundColor, s.title])")


def use_key(page, key: str) -> None:
    page.fill("#key", key)
    page.click("#key-form button")


def ask(page, models: list[str]) -> None:
    for box in page.locator("#models input[type=checkbox]").all():
        box.set_checked(box.get_attribute("value") in models)
    page.fill("#prompt", QUESTION)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(MAX_TOKENS))
    page.click("#ask")
    page.wait_for_function("document.querySelectorAll('#answers [data-state=streaming]').length === 0 && "
                           f"document.querySelectorAll('#answers article').length === {len(models)}")
    page.wait_for_function("!document.getElementById('ask').disabled")


def test_the_page_asks_for_the_key_and_keeps_it_for_the_session(page, server):
    page.goto(server["url"] + "/")  # also served at /playground
    banner = page.locator("#banner")
    banner.wait_for(state="visible")
    assert "Incorrect or missing API key" in banner.inner_text() and "Use key" in banner.inner_text()
    use_key(page, "wrong-key")
    page.wait_for_function("document.getElementById('server').textContent === 'not connected'")
    assert "Incorrect or missing API key" in banner.inner_text()
    use_key(page, KEY)
    model_row(page, "billing").wait_for()
    assert banner.is_hidden()
    assert page.evaluate("sessionStorage.getItem('lorakit-api-key')") == KEY
    page.reload()  # typed once: a reload (or a new page of the same tab) still has it
    model_row(page, "billing").wait_for()
    assert page.locator("#key").input_value() == "" and page.locator("#key").get_attribute("placeholder") == \
        "key set for this session"


def test_the_adapter_list_shows_rank_targets_size_and_status(page, server):
    cards = {c["id"]: c for c in server["http"].get("/v1/models").json()["data"]}
    assert [row.get_attribute("data-model") for row in page.locator("#models li").all()] == list(cards)
    assert model_row(page, BASE).get_attribute("data-status") == "base"
    assert "context 256 tokens" in model_row(page, BASE).inner_text()
    for name, rank, targets in (("billing", 8, "q_proj, k_proj, v_proj, o_proj"), ("support", 4, "q_proj, v_proj")):
        info = cards[name]["lorakit"]
        assert (info["rank"], info["targets"]) == (rank, targets.split(", "))
        text = model_row(page, name).inner_text()
        size = human_bytes(info["weights_bytes"])  # as `lorakit inspect` writes it
        assert f"rank {rank} · {targets} · {size} · {info['parameters']:,} params" in text, text
        assert model_row(page, name).get_attribute("data-status") == "on-disk" and "on disk" in text
    # a folder whose weights cannot be read is listed with what is wrong with it
    assert "cannot be read" in cards["damaged"]["lorakit"]["error"]
    assert "truncated or corrupt" in model_row(page, "damaged").locator(".reason").inner_text()


def test_base_and_two_adapters_stream_side_by_side_equal_to_the_api(page, server, tmp_path_factory):
    ask(page, [BASE, "billing", "support"])
    panels = page.locator("#answers article")
    assert [p.get_attribute("data-model") for p in panels.all()] == [BASE, "billing", "support"]
    texts = {}
    for panel in panels.all():
        model = panel.get_attribute("data-model")
        assert panel.get_attribute("data-state") == "done", panel.inner_text()
        assert int(panel.get_attribute("data-chunks")) > 3  # it came in piece by piece, not as one body
        expected = api_answer(server, model)
        answer = panel.locator(".answer")
        texts[model] = answer.text_content()
        assert texts[model] == expected["message"]["content"] and texts[model]
        assert f"stop: {expected['finish_reason']}" in panel.locator(".meta").inner_text()
        # each token shaded by its probability: the same log probabilities the API gives
        spans = shaded_spans(answer)
        special = set(tiny_tokenizer().all_special_tokens)  # a special token adds no text: nothing to shade
        tokens = [t for t in expected["logprobs"]["content"] if t["token"] not in special]
        assert [text for text, *_ in spans] == [t["token"] for t in tokens]
        for (_, logprob, background, _), token in zip(spans, tokens):
            assert math.isclose(float(logprob), token["logprob"], abs_tol=1e-5)
            alpha = float(background.rsplit(",", 1)[1].rstrip(")"))
            assert math.isclose(alpha, 0.7 * (1 - math.exp(token["logprob"])), abs_tol=1 / 255)  # 8-bit alpha
        assert spans[0][3].startswith("p = ") and "alternatives:" in spans[0][3]
    assert len(set(texts.values())) == 3  # three different models answered
    # asking loaded both adapters: the list says so
    page.wait_for_function("document.querySelector('#models li[data-model=billing]').dataset.status === 'resident'")
    assert model_row(page, "support").get_attribute("data-status") == "resident"
    shots = artifact_dir(tmp_path_factory)
    page.screenshot(path=str(shots / "playground-1280x800.png"))
    page.set_viewport_size(PHONE)
    try:
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # nothing runs off the side
        page.locator("#answers").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "playground-390x844.png"))
    finally:
        page.set_viewport_size(LAPTOP)
    assert png_size(shots / "playground-1280x800.png") == (1280, 800)
    assert png_size(shots / "playground-390x844.png") == (390, 844)


def test_completion_mode_streams_the_api_text(page, server):
    page.select_option("#mode", "completion")
    assert page.locator("#system-row").is_hidden()  # a system prompt is for chat
    try:
        ask(page, ["support"])
    finally:
        page.select_option("#mode", "chat")
    r = server["http"].post("/v1/completions", json={"model": "support", "prompt": QUESTION, "temperature": 0,
                                                     "max_tokens": MAX_TOKENS, "logprobs": 3})
    choice = r.json()["choices"][0]
    answer = page.locator('#answers article[data-model="support"] .answer')
    assert answer.text_content() == choice["text"] and choice["text"]
    spans = shaded_spans(answer)
    shown = [(t, lp) for t, lp in zip(choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"])
             if t not in set(tiny_tokenizer().all_special_tokens)]
    assert [text for text, *_ in spans] == [t for t, _ in shown]
    assert all(math.isclose(float(span[1]), lp, abs_tol=1e-5) for span, (_, lp) in zip(spans, shown))


def test_load_and_unload_from_the_page(page, server):
    model_row(page, "billing").locator("button", has_text="Unload").click()
    page.wait_for_function("document.querySelector('#models li[data-model=billing]').dataset.status === 'on-disk'")
    assert "Adapter 'billing' unloaded." in page.locator("#banner").inner_text()
    page.fill("#load-name", "billing-v2")
    page.fill("#load-path", "billing")
    page.click("#load-button")
    model_row(page, "billing-v2").wait_for()
    assert model_row(page, "billing-v2").get_attribute("data-status") == "resident"
    assert "Adapter 'billing-v2' loaded." in page.locator("#banner").inner_text()
    assert "billing-v2" in [c["id"] for c in server["http"].get("/v1/models").json()["data"]]


def test_server_errors_are_shown_in_the_page(page, server):
    # an adapter made for another base: the load fails, and the list keeps the reason
    model_row(page, "otherbase").locator("button", has_text="Load").click()
    page.wait_for_function("document.querySelector('#models li[data-model=otherbase]').dataset.status === 'error'")
    banner = page.locator("#banner").inner_text()
    assert banner.startswith("Loading otherbase failed: Adapter 'otherbase'") and "could not be loaded" in banner
    assert "does not fit this base model" in model_row(page, "otherbase").locator(".reason").inner_text()
    # a path outside the adapter directories
    page.fill("#load-name", "ghost")
    page.fill("#load-path", "/etc")
    page.click("#load-button")
    page.wait_for_function("document.getElementById('banner').textContent.includes('/etc')")
    assert "outside the configured adapter directories" in page.locator("#banner").inner_text()
    # an adapter unloaded behind the page's back: its panel says the model does not exist, the others answer
    server["http"].post("/v1/unload_lora_adapter", json={"lora_name": "billing-v2"}).raise_for_status()
    ask(page, [BASE, "billing-v2"])
    failed = page.locator('#answers article[data-model="billing-v2"]')
    assert failed.get_attribute("data-state") == "error"
    assert "The model 'billing-v2' does not exist" in failed.locator(".panel-error").inner_text()
    done = page.locator(f'#answers article[data-model="{BASE}"]')
    assert done.get_attribute("data-state") == "done"
    assert done.locator(".answer").text_content() == api_answer(server, BASE)["message"]["content"]
    # a wrong key typed later: the next request shows the server's refusal
    use_key(page, "not-the-key")
    page.wait_for_function("document.getElementById('banner').textContent.includes('Incorrect or missing API key')")
    use_key(page, KEY)
    page.wait_for_function("document.getElementById('banner').hidden")
