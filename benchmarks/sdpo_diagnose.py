"""`python benchmarks/sdpo_vs_grpo.py --diagnose`: what the self-teacher's context makes it prefer, before training.

For each task and seed, the starting model samples `--batches` groups of rollouts (the budget's group size and
temperature) on the first training prompts. Every arm named then grades the same rollouts with its own reward options,
builds its own teacher contexts (`selfdistill.context.teacher_prompts` with the arm's sources and templates) and
scores the student's tokens under them with the starting weights (what live, EMA and base teachers all are at step
0). Per token t of rollout b, the sampled-token advantage is `a_bt = log T(x_bt | context_b) − log S(x_bt)`.

Reported per arm, separately for failed and successful rollouts:
- `with_context`: the fraction that gets a teacher context at all (the others get no distillation term);
- `seq_adv`: the mean of Σ_t a_bt; `wrong_sign`: the fraction whose Σ_t a_bt has the wrong sign (> 0 on a failed
  rollout, < 0 on a successful one): there the dense signal pushes against the reward;
- `answer_adv` / `answer_wrong_sign`: the same on the tokens of the answer the grader read only (the digits);
- `answer_share`: the share of Σ|a| that falls on those answer tokens (the rest goes to wording and format);
- `wrong_digit_adv` / `wrong_digit_wrong_sign`: on failed rollouts, the answer digits that differ from the gold's
  (where the rollout went wrong): the mean advantage there, and how often it is positive (the wrong sign);
- `teacher_knows`: on failed rollouts, how often the teacher's most likely token at the answer's first digit is the
  gold's first digit (what a logit-level term pulls that position towards);
- `teacher_reply_correct` / `teacher_reply_leaks`: the teacher's own greedy reply to its context (on failed rollouts):
  how often it is right (how often the context helps), and how often it starts like a revision ("Sure", "revised",
  "Here") instead of answering, which is what a student distilled from it learns to write.
"""

import os
import re
import statistics
import tempfile

LEAK = re.compile(r"\b(revised|sure|here's|here is|correct answer|feedback|earlier|previous)\b", re.IGNORECASE)


def _answer_positions(tokenizer, ids: list[int], answer: str | None) -> list[int]:
    """Token positions covering the last occurrence of `answer` in the decoded completion (empty if none)."""
    if not answer:
        return []
    text = tokenizer.decode(ids, skip_special_tokens=True)
    start = text.rfind(answer)
    if start < 0:
        return []
    end, positions = start + len(answer), []
    for i in range(len(ids)):
        before = len(tokenizer.decode(ids[:i], skip_special_tokens=True))
        after = len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True))
        if after > start and before < end:
            positions.append(i)
    return positions


def _wrong_digits(tokenizer, ids: list[int], positions: list[int], answer: str | None, gold: str) -> list[int]:
    """The answer tokens whose digits differ from the gold's, aligned from the left (every digit when the lengths
    differ): where a failed rollout went wrong, and where a positive advantage has the wrong sign."""
    if not answer or not positions:
        return []
    if len(answer) != len(gold):
        return positions
    wrong, offset = [], 0
    for i in positions:
        text = tokenizer.decode([ids[i]]).strip()
        if text and answer.find(text, offset) >= 0:
            start = answer.find(text, offset)
            if answer[start : start + len(text)] != gold[start : start + len(text)]:
                wrong.append(i)
            offset = start + len(text)
    return wrong


def _sample(model, tokenizer, prompt, group: int, settings: dict):
    """`(prompt_ids, prompt_mask, completion_ids, completion_mask)` of `group` rollouts of one chat prompt, the
    completion cut after its first EOS (as GRPOTrainer does)."""
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    batch = tokenizer([text] * group, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**batch, do_sample=True, temperature=settings["temperature"], top_k=0, top_p=1.0,
                         max_new_tokens=settings["max_completion_length"], pad_token_id=tokenizer.pad_token_id)
    completion = out[:, batch["input_ids"].shape[1] :]
    is_eos = (completion == tokenizer.eos_token_id).long()
    mask = ((is_eos.cumsum(1) - is_eos) == 0).long()
    return batch["input_ids"], batch["attention_mask"], completion * mask + tokenizer.pad_token_id * (1 - mask), mask


def _tokenize(tokenizer, prompts: list):
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"], batch["attention_mask"]


def _teacher_view(model, tokenizer, teacher_prompts: list, c_ids, c_mask, temperature: float):
    """Teacher log-probs of the completion tokens, and its most likely token and probability at each position."""
    import torch

    from selfdistill.teachers import causal_lm_parts, completion_hidden_states

    p_ids, p_mask = _tokenize(tokenizer, teacher_prompts)
    with torch.no_grad():
        hidden = completion_hidden_states(model, p_ids, p_mask, c_ids, c_mask)
        logp = (causal_lm_parts(model)[1](hidden).float() / temperature).log_softmax(-1)
    top_logp, top_ids = logp.max(-1)
    return logp.gather(-1, c_ids[..., None]).squeeze(-1), top_ids, top_logp.exp()


def _stats(rows: list[dict]) -> dict:
    def mean(values):
        return statistics.mean(values) if values else float("nan")

    out = {}
    for kind, failed in (("failed", True), ("success", False)):
        group = [r for r in rows if r["failed"] == failed]
        scored = [r for r in group if r["has_teacher"]]
        sign = 1 if failed else -1  # the wrong sign: a > 0 on a failure, a < 0 on a success
        answer_adv = [a for r in scored for a in r["answer_adv"]]
        entry = {
            "n": len(group),
            "with_context": len(scored) / len(group) if group else float("nan"),
            "seq_adv": mean([sum(r["adv"]) for r in scored]),
            "wrong_sign": mean([float(sign * sum(r["adv"]) > 0) for r in scored]),
            "answer_adv": mean(answer_adv),
            "answer_wrong_sign": mean([float(sign * a > 0) for a in answer_adv]),
            "answer_share": mean([sum(abs(a) for a in r["answer_adv"]) / max(sum(abs(a) for a in r["adv"]), 1e-9)
                                  for r in scored if r["answer_adv"]]),
        }
        if failed:
            wrong = [a for r in scored for a in r["wrong_digit_adv"]]
            entry["wrong_digit_adv"] = mean(wrong)
            entry["wrong_digit_wrong_sign"] = mean([float(a > 0) for a in wrong])
            entry["teacher_knows"] = mean([float(r["teacher_knows"]) for r in scored if r["teacher_knows"] is not None])
            replies = [r for r in scored if "teacher_reply" in r]
            entry["teacher_reply_correct"] = mean([float(r["teacher_reply_reward"] == 1.0) for r in replies])
            entry["teacher_reply_leaks"] = mean([float(bool(LEAK.search(r["teacher_reply"]))) for r in replies])
        out[kind] = entry
    return out


def diagnose(args, tasks: list[str], arms: list[str], seeds: list[int]) -> dict:
    """Run the diagnosis of the module docstring; print a table per task and write OUT/diagnose/<task>.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdpo_vs_grpo import ARMS, _build, settings_of, write_json
    from selfdistill.context import teacher_prompts
    from selfdistill.evaluate import generate
    from selfdistill.rewards import FEEDBACK_KEY, get_reward
    from selfdistill.rewards.answers import final_answer
    from selfdistill.rewards.math import problem_text
    from selfdistill.teachers import ModelTeacher

    torch.set_num_threads(1)
    unknown = [a for a in arms if ARMS[a]["method"] != "sdpo"]
    if unknown:
        raise SystemExit(f"--diagnose compares self-distillation arms; not: {unknown}")
    report = {}
    with tempfile.TemporaryDirectory() as scratch:
        for task in tasks:
            rows = {arm: [] for arm in arms}
            examples = {}
            for seed in seeds:
                built = {arm: _build(settings_of(task, arm, seed, args), scratch) for arm in arms}
                first = settings_of(task, arms[0], seed, args)
                run, config, model_path, dataset = built[arms[0]]
                tokenizer = AutoTokenizer.from_pretrained(model_path)
                model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
                student = ModelTeacher(model, first["temperature"], batch_size=16)
                torch.manual_seed(seed)
                for index in range(args.batches):
                    group = first["num_generations"]
                    prompt, gold = dataset[index]["prompt"], dataset[index]["solution"]
                    with torch.no_grad():
                        p_ids, p_mask, c_ids, c_mask = _sample(model, tokenizer, prompt, group, first)
                        logp_s = student.score(p_ids, p_mask, c_ids, c_mask).logp_BT
                    ids = [row[m.bool()].tolist() for row, m in zip(c_ids, c_mask)]
                    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
                    answers = [final_answer(t, problem_text(prompt), last_number=True).text for t in texts]
                    positions = [_answer_positions(tokenizer, i, a) for i, a in zip(ids, answers)]
                    for arm in arms:
                        arm_run, arm_config, _, arm_data = built[arm]
                        reward = get_reward("accuracy", **arm_run.reward_options["accuracy"])
                        slots = [[] for _ in texts]
                        rewards = reward(prompts=[prompt] * group, completions=texts, solution=[gold] * group,
                                         **{FEEDBACK_KEY: slots})
                        columns = {c: [arm_data[index][c]] * group for c in ("privileged_context",)
                                   if c in arm_data.column_names}
                        contexts = teacher_prompts([prompt] * group, texts, rewards,
                                                   ["\n".join(s) or None for s in slots], columns, group_size=group,
                                                   sources=arm_config.context_sources,
                                                   success_threshold=arm_config.success_threshold,
                                                   templates=arm_config.templates)
                        has = [c is not None for c in contexts]
                        logp_t, top_ids, top_p = _teacher_view(
                            model, tokenizer, [c if c is not None else prompt for c in contexts], c_ids, c_mask,
                            first["temperature"])
                        failed_with_context = [b for b in range(group) if has[b] and rewards[b] < 1.0]
                        replies = generate(model, tokenizer, [contexts[b] for b in failed_with_context],
                                           max_new_tokens=first["max_completion_length"], temperature=0.0,
                                           batch_size=group) if failed_with_context else []
                        reply_rewards = reward(prompts=[prompt] * len(replies), completions=replies,
                                               solution=[gold] * len(replies))
                        reply_of = dict(zip(failed_with_context, zip(replies, reply_rewards)))
                        for b in range(group):
                            n = len(ids[b])
                            adv = (logp_t[b, :n] - logp_s[b, :n]).tolist()
                            row = {
                                "seed": seed, "prompt_index": index, "gold": gold, "completion": texts[b],
                                "reward": rewards[b], "failed": rewards[b] < 1.0, "has_teacher": has[b],
                                "feedback": "\n".join(slots[b]) or None, "adv": adv if has[b] else [],
                                "answer": answers[b], "answer_positions": positions[b],
                                "answer_adv": [adv[i] for i in positions[b]] if has[b] else [],
                                "wrong_digit_adv": [adv[i] for i in _wrong_digits(tokenizer, ids[b], positions[b],
                                                                                  answers[b], gold)] if has[b] else [],
                                "teacher_knows": (tokenizer.decode([int(top_ids[b, positions[b][0]])]).strip()
                                                  == gold[0]) if has[b] and positions[b] else None,
                                "tokens": [{"token": tokenizer.decode([t]), "logp_student": round(ls, 3),
                                            "logp_teacher": round(lt, 3),
                                            "teacher_top": tokenizer.decode([int(top)]), "teacher_top_p": round(pt, 3)}
                                           for t, ls, lt, top, pt in zip(ids[b], logp_s[b, :n].tolist(),
                                                                         logp_t[b, :n].tolist(), top_ids[b, :n].tolist(),
                                                                         top_p[b, :n].tolist())],
                            }
                            if b in reply_of:
                                row["teacher_reply"], row["teacher_reply_reward"] = reply_of[b]
                            rows[arm].append(row)
                        examples.setdefault(arm, contexts[next((b for b in range(group) if has[b]), 0)])
                del model
            report[task] = {"stats": {arm: _stats(r) for arm, r in rows.items()}, "rows": rows,
                            "teacher_prompt_example": examples}
            write_json(os.path.join(args.output, "diagnose", f"{task}.json"), report[task])
            print(format_diagnosis(task, report[task]))
    return report


def format_diagnosis(task: str, diagnosis: dict) -> str:
    cols = ["n", "with_context", "seq_adv", "wrong_sign", "answer_adv", "answer_wrong_sign", "answer_share"]
    extra = ["wrong_digit_adv", "wrong_digit_wrong_sign", "teacher_knows", "teacher_reply_correct",
             "teacher_reply_leaks"]
    lines = [f"\n### diagnosis: {task}", "",
             "| arm | rollouts | " + " | ".join(cols) + " | " + " | ".join(extra) + " |",
             "|---|---|" + "---:|" * (len(cols) + len(extra))]
    for arm, stats in diagnosis["stats"].items():
        for kind in ("failed", "success"):
            s = stats[kind]
            cells = [f"{s[c]:.3g}" if isinstance(s[c], float) else str(s[c]) for c in cols]
            cells += [f"{s[c]:.3g}" if c in s else "" for c in extra]
            lines.append(f"| {arm} | {kind} | " + " | ".join(cells) + " |")
    for arm, rows in diagnosis["rows"].items():
        for failed in (True, False):
            row = next((r for r in rows if r["failed"] == failed and r["has_teacher"]), None)
            if row is None:
                continue
            tokens = " ".join(f"{t['token']!r}:{t['logp_teacher'] - t['logp_student']:+.1f}(T→{t['teacher_top']!r})"
                              for t in row["tokens"])
            lines.append(f"\n{arm}, {'failed' if failed else 'successful'} rollout (gold {row['gold']}): "
                         f"{row['completion']!r}\n  feedback: {row['feedback']!r}\n  a_t per token: {tokens}")
            if "teacher_reply" in row:
                lines.append(f"  teacher's own greedy reply: {row['teacher_reply']!r}")
    return "\n".join(lines)
