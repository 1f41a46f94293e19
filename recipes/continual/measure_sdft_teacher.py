"""What the SDFT teacher knows: the model shown the demonstration of the very request it answers (the sdft preset's
teacher context, `context.teacher_prompt`), on the held-out requests of the continual recipe's new skill.

SDFT can only teach what its teacher does: if the model cannot use a demonstration in its context, self-distillation
has no signal towards the new skill. Printed, for each model given (default: the start, SmolLM2-135M-Instruct), without the context, with the preset's
demonstration template (the SDFT paper's, which ends "Now answer with a response of your own, including the thinking
process.") and with `--template` if given:
- greedy pass@1 on the held-out `tool_calls` requests (graded like the student);
- the mean log-probability per token of the demonstration itself, and the probability of its first token (`{`).

    OMP_NUM_THREADS=1 python recipes/continual/measure_sdft_teacher.py [MODEL_DIR ...] [--n 40] [--template TEXT]
"""

import argparse

import torch

from selfdistill.cli import resolve_model
from selfdistill.context import Templates, teacher_prompt
from selfdistill.continual import load_model
from selfdistill.evaluate import generate
from selfdistill.rewards import ToolCallMatch
from selfdistill.tasks import load_task


@torch.no_grad()
def demonstration_logp(model, tokenizer, prompts: list, demonstrations: list[str]) -> tuple[float, float]:
    """`(mean log π(token | prompt, earlier demonstration tokens) over all demonstration tokens, mean π(first
    demonstration token | prompt))`: how likely the demonstration is once begun, and how likely it is to begin."""
    total, tokens, first = 0.0, 0, 0.0
    for prompt, demonstration in zip(prompts, demonstrations):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        answer_ids = tokenizer(demonstration, add_special_tokens=False, return_tensors="pt")["input_ids"]
        logits = model(torch.cat([prompt_ids, answer_ids], 1)).logits[0, prompt_ids.shape[1] - 1 : -1]
        logp = logits.float().log_softmax(-1).gather(1, answer_ids[0, :, None])[:, 0]
        total, tokens, first = total + logp.sum().item(), tokens + len(logp), first + logp[0].exp().item()
    return total / tokens, first / len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["smollm2"])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--template", help="another demonstration template, with {prompt} and {demonstration}")
    args = parser.parse_args()
    rows = load_task("tool_calls", split="test", n=args.n, seed=0)
    contexts = {"without the demonstration": rows["prompt"]}
    for label, templates in [("teacher, preset template", Templates())] + (
            [("teacher, --template", Templates(demonstration=args.template))] if args.template else []):
        contexts[label] = [teacher_prompt(p, demonstration=d, templates=templates)
                           for p, d in zip(rows["prompt"], rows["demonstration"])]
    grade = ToolCallMatch()
    for name in args.models:
        model, tokenizer = load_model(resolve_model(name))
        for label, prompts in contexts.items():
            completions = generate(model, tokenizer, prompts, max_new_tokens=40, temperature=0, batch_size=20)
            scores = grade(completions=completions, call=rows["call"])
            logp, first = demonstration_logp(model, tokenizer, prompts, rows["demonstration"])
            print(f"{name} | {label}: pass@1 {sum(scores) / len(scores):.3f}, demonstration log-prob "
                  f"{logp:.3f} nats/token, probability of its first token {first:.3f}; first answer: "
                  f"{completions[0][:100]!r}")


if __name__ == "__main__":
    main()
