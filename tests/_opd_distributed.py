"""Two steps of OnPolicyDistillTrainer that record every generation batch each rank scores.

Launched by `tests/test_opd.py::test_two_processes_match_single_process`:
    accelerate launch --cpu --num_processes 2 tests/_opd_distributed.py STUDENT_DIR TEACHER_DIR OUT_DIR
Each rank writes OUT_DIR/rank{r}.pt: one record per generation batch, holding the dataset rows it got, the prompt and
completion token ids, the per-token advantages it computed and the student weights it sampled with. The test
replays these exact rollouts through a single-process trainer and compares the advantages.

The test imports the settings below, so both runs share them.
"""

import os
import sys

import torch
from datasets import Dataset

from selfdistill.trainers import OnPolicyDistillConfig, OnPolicyDistillTrainer

# 6 rollouts per rank, 4 per prompt: a step's 12 rollouts are 3 groups, and the middle one is split across the two
# ranks, so its reward normalisation needs the rewards of both.
PER_DEVICE_BATCH, NUM_GENERATIONS = 6, 4
# Not 1, so that a factor dropped anywhere shows up in the comparison.
SETTINGS = dict(temperature=0.8, kl_coef=0.5, task_weight=2.0, max_completion_length=12, learning_rate=1e-2, seed=7)


def char_length_reward(completions, **kwargs) -> list[float]:
    """Differs between rollouts of one prompt, so the group advantages are not all zero."""
    return [len(completion[0]["content"]) / 10 for completion in completions]


def prompts_dataset(n: int = 24, offset: int = 0) -> Dataset:
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"What is {i} + {3 * i + 1}?"}]} for i in range(offset, offset + n)]
    )


def make_config(output_dir: str, **overrides) -> OnPolicyDistillConfig:
    values = dict(
        output_dir=output_dir,
        per_device_train_batch_size=2 * NUM_GENERATIONS,  # single process: 2 groups
        num_generations=NUM_GENERATIONS,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,  # fp32 end to end, so the two runs can agree to 1e-5
        gradient_checkpointing=False,
        **SETTINGS,
    )
    values.update(overrides)
    return OnPolicyDistillConfig(**values)


class RecordingTrainer(OnPolicyDistillTrainer):
    records: list

    def _generate_and_score_completions(self, inputs):
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        batch = super()._generate_and_score_completions(inputs)
        prompt_mask, completion_mask = batch["prompt_mask"].bool(), batch["completion_mask"].bool()
        self.records.append(
            {
                "inputs": inputs,
                "prompt_ids": [ids[m].tolist() for ids, m in zip(batch["prompt_ids"], prompt_mask)],
                "completion_ids": [ids[m].tolist() for ids, m in zip(batch["completion_ids"], completion_mask)],
                "weights": weights,
            }
        )
        return batch

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)  # forms the (B, T) advantages on-policy
        # GRPO shuffles the generation batch before the loss: key each row's advantages by its (prompt, completion),
        # which identifies them (equal pairs in a group get equal advantages).
        rows = zip(inputs["prompt_ids"], inputs["prompt_mask"].bool(), inputs["completion_ids"],
                   inputs["completion_mask"].bool(), inputs["advantages"])
        self.records[-1]["advantages"] = {
            (tuple(p[pm].tolist()), tuple(c[cm].tolist())): adv[cm].detach() for p, pm, c, cm, adv in rows
        }
        return loss


def main(student_dir: str, teacher_dir: str, out_dir: str) -> None:
    trainer = RecordingTrainer(
        model=student_dir,
        teacher_model=teacher_dir,
        reward_funcs=[char_length_reward],
        args=make_config(os.path.join(out_dir, "trainer"), per_device_train_batch_size=PER_DEVICE_BATCH),
        train_dataset=prompts_dataset(),
    )
    trainer.records = []
    trainer.train()
    torch.save(trainer.records, os.path.join(out_dir, f"rank{trainer.accelerator.process_index}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
