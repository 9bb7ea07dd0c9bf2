"""The playground page in headless Chromium (Selenium), on the real bundled model with
MLflow logging on: fill the form, Generate, and find a row with the right parameters in the
results table; copy the Hydra override line and check that jobs.pipeline would run exactly
that parameter set; structured output and logprobs from the form. Leaves a screenshot in
artifacts/playground.png. Then the page on a server with an API key (tiny model): it asks
for the key and works once given it."""
from __future__ import annotations

import dataclasses
import json
import os

import httpx
import pytest

from libinfer import PRESETS, GenerationParams
from test_playground import ROOT, pipeline_generation, playground_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = os.path.join(ROOT, "artifacts", "playground.png")
PROMPT = "The capital of France is"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(job_env, tmp_path_factory):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail("headless Chromium is missing: bash scripts/install_chromium.sh (./run test does it)")
    root = tmp_path_factory.mktemp("playground_browser")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with playground_server(job_env["env"], "model=smollm2_135m", "mlflow.enabled=true", f"mlflow.tracking_uri={uri}",
                           "mlflow.experiment=playground-test", log_path=root / "server.log") as url:
        yield url, uri


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1600,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def set_value(driver, element_id: str, value: str) -> None:
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(value)


def set_checked(driver, element_id: str, checked: bool) -> None:
    el = driver.find_element("id", element_id)
    if el.is_selected() != checked:
        el.click()


def rows(driver):
    return driver.find_elements("css selector", "#results > tbody > tr")      # not the logprobs tables inside


def generate_and_wait(driver, n_rows_before: int):
    from selenium.webdriver.support.ui import WebDriverWait
    driver.find_element("id", "generate").click()
    WebDriverWait(driver, 180).until(lambda d: len(rows(d)) > n_rows_before or "error" in
                                     d.find_element("id", "status").get_attribute("class"))
    assert len(rows(driver)) == n_rows_before + 1, driver.find_element("id", "status").text
    return rows(driver)[0]                      # newest first


def cell(row, name: str) -> str:
    return row.find_element("css selector", f"td.{name}").text


def test_playground_in_a_browser(server, browser):
    from selenium.webdriver.support.ui import Select, WebDriverWait
    url, mlflow_uri = server
    d = browser
    d.get(url + "/")
    WebDriverWait(d, 30).until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
    assert "smollm2_135m" in d.find_element("id", "model").text
    for f in dataclasses.fields(GenerationParams):        # a control for every parameter
        assert d.find_element("id", f.name).is_displayed(), f.name

    # Run 1: preset test1 fills the form; then 8 tokens instead of 16.
    Select(d.find_element("id", "preset")).select_by_value("test1")
    assert d.find_element("id", "temperature").get_attribute("value") == "0"
    assert d.find_element("id", "repetition_penalty").get_attribute("value") == "5"
    assert d.find_element("id", "stop_sequences").get_attribute("value") == '["\\n"]'
    assert d.find_element("id", "greedy").is_selected()
    set_value(d, "prompt", PROMPT)
    set_value(d, "out_seq_length", "8")
    row = generate_and_wait(d, 0)
    run1 = PRESETS["test1"].replace(out_seq_length=8)
    assert json.loads(row.get_attribute("data-params")) == run1.to_dict()
    shown = {k: cell(row, "p-" + k) for k in ("temperature", "out_seq_length", "greedy", "top_p", "top_k",
                                               "repetition_penalty", "stop_sequences", "recompute", "n")}
    assert shown == {"temperature": "0", "out_seq_length": "8", "greedy": "true", "top_p": "0.8", "top_k": "0",
                     "repetition_penalty": "5", "stop_sequences": '["\\n"]', "recompute": "false", "n": "1"}
    api = httpx.post(url + "/v1/generate", json={"prompt": PROMPT, **run1.to_dict()}, timeout=120).json()
    text = api["results"][0]["candidates"][0]["text"]
    assert text.strip() and text.strip() in cell(row, "output")   # the model's real (greedy) output
    assert float(cell(row, "speed")) > 0

    # Run 2: test2, sampled, with start text and a seed; run 1 stays in the table.
    Select(d.find_element("id", "preset")).select_by_value("test2")
    set_checked(d, "greedy", False)
    set_value(d, "temperature", "0.7")
    set_value(d, "top_k", "40")
    set_value(d, "seed", "7")
    set_value(d, "n", "2")
    set_value(d, "start", "\\nA:")                          # typed as an escape, sent as a newline
    set_value(d, "out_seq_length", "12")
    row = generate_and_wait(d, 1)
    run2 = PRESETS["test2"].replace(greedy=False, temperature=0.7, top_k=40, seed=7, n=2, start="\nA:",
                                    out_seq_length=12)
    assert json.loads(row.get_attribute("data-params")) == run2.to_dict()
    assert cell(row, "p-greedy") == "false" and cell(row, "p-seed") == "7" and cell(row, "p-start") == '"\\nA:"'
    assert len(row.find_elements("css selector", "td.output .cand")) == 2
    assert json.loads(rows(d)[1].get_attribute("data-params")) == run1.to_dict()

    # The override line for jobs.pipeline is exactly run 2's parameter set.
    d.find_element("id", "copy-overrides").click()
    WebDriverWait(d, 30).until(lambda d: d.find_element("id", "overrides").get_attribute("value"))
    line = d.find_element("id", "overrides").get_attribute("value")
    assert pipeline_generation(line) == run2

    # A bad value: the server's message names the field; no row is added.
    set_value(d, "top_p", "2")
    d.find_element("id", "generate").click()
    WebDriverWait(d, 30).until(lambda d: "top_p" in d.find_element("id", "status").text)
    assert len(rows(d)) == 2
    set_value(d, "top_p", "0.8")

    # Run 3: structured output (a choice) with logprobs: the answer is one of the choices and
    # its tokens are listed with their log-probabilities.
    Select(d.find_element("id", "preset")).select_by_value("test1")
    set_value(d, "out_seq_length", "8")
    set_value(d, "logprobs", "2")
    set_value(d, "guided_choice", '["Paris", "London"]')
    row = generate_and_wait(d, 2)
    run3 = PRESETS["test1"].replace(out_seq_length=8, logprobs=2, guided_choice=["Paris", "London"])
    assert json.loads(row.get_attribute("data-params")) == run3.to_dict()
    assert cell(row, "p-guide") == 'choice: ["Paris","London"]' and cell(row, "p-logprobs") == "2"
    cand = row.find_element("css selector", "td.output .cand")
    assert cand.text.split(" [")[0] in ("Paris", "London"), cand.text
    cand.find_element("css selector", "details.logprobs summary").click()
    lp_rows = cand.find_elements("css selector", "table.lp tr")
    n_tokens = int(cand.find_element("css selector", ".reason").text.split(", ")[1].split()[0])
    assert len(lp_rows) == n_tokens >= 1 and float(lp_rows[0].find_elements("tag name", "td")[1].text) <= 0
    assert not d.find_element("id", "api_key").is_displayed()      # this server has no key
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    assert d.save_screenshot(SCREENSHOT)
    set_value(d, "guided_choice", "")
    set_value(d, "logprobs", "")

    # MLflow: one run per Generate (the three from the page and the API call), pipeline-style params.
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("playground-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 4
    assert sorted(r.data.params["generation.out_seq_length"] for r in runs) == ["12", "8", "8", "8"]
    latest = max(runs, key=lambda r: r.info.start_time)
    assert latest.data.tags["job"] == "playground" and latest.data.metrics["generated_tokens"] > 0
    outputs = os.path.join(mlflow.artifacts.download_artifacts(run_id=latest.info.run_id, tracking_uri=mlflow_uri,
                                                               artifact_path="outputs.json"))
    assert json.load(open(outputs))[0]["prompt"] == PROMPT


@pytest.fixture(scope="module")
def keyed_server(job_env, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("playground_browser_key")
    with playground_server(job_env["env"], "model=tiny_random", "api_key=sk-page-test",
                           log_path=root / "server.log") as url:
        yield url


def test_page_asks_for_the_api_key(keyed_server, browser):
    from selenium.webdriver.support.ui import WebDriverWait
    d = browser
    d.get(keyed_server + "/")
    WebDriverWait(d, 30).until(lambda d: "API key" in d.find_element("id", "status").text)
    assert d.find_element("id", "api_key").is_displayed() and "error" in d.find_element("id", "status").get_attribute("class")
    set_value(d, "api_key", "sk-page-test")
    d.find_element("id", "prompt").click()                  # leaving the field sends `change`
    WebDriverWait(d, 30).until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
    assert "tiny_random" in d.find_element("id", "model").text
    set_value(d, "prompt", PROMPT)
    set_value(d, "out_seq_length", "4")
    row = generate_and_wait(d, 0)
    assert json.loads(row.get_attribute("data-params"))["out_seq_length"] == 4
