"""The plugin's throughput log (`minicpmv/samples_per_second`) through a real transformers Trainer on a small model
whose batches take known times: making a batch (as decoding and slicing pictures does) counts, evaluations between
the logs do not."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from axolotl_minicpmv.integration.callbacks import ThroughputCallback

COLLATE_S, FORWARD_S, BATCH = 0.1, 0.02, 2  # a step: about 0.12 s for 2 samples, about 16 samples/s


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"x": torch.full((4,), float(i)), "labels": torch.tensor(1.0)}


class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        time.sleep(FORWARD_S)
        return {"loss": (self.layer(x).squeeze(-1) - labels).pow(2).mean()}


class Loggers(TrainerCallback):
    """What the loggers after the plugin's callback (printer, tensorboard, wandb) receive."""

    def __init__(self):
        self.rates = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "minicpmv/samples_per_second" in logs:
            self.rates.append(logs["minicpmv/samples_per_second"])


def collate(rows):
    time.sleep(COLLATE_S)
    return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows])}


@pytest.mark.parametrize(
    "logging_steps, eval_on_start, eval_sets",
    [(1, False, 1), (2, True, 2)],  # Axolotl evaluates at the start whenever eval_steps is set; eval sets may be several
)
def test_the_logged_rate_counts_batch_making_and_leaves_out_evaluation(tmp_path, logging_steps, eval_on_start, eval_sets):
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=12, per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH, logging_steps=logging_steps, eval_strategy="steps", eval_steps=3,
        eval_on_start=eval_on_start, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, learning_rate=1e-3,
    )  # fmt: skip
    # 4 batches an eval set: about 0.5 s an evaluation, after steps 3, 6, 9, 12 (and before the first)
    eval_rows = {f"set{i}": torch.utils.data.Subset(Rows(), range(8)) for i in range(eval_sets)}
    trainer = Trainer(model=Slow(), args=args, train_dataset=Rows(), eval_dataset=eval_rows, data_collator=collate)
    loggers = Loggers()
    trainer.add_callback(ThroughputCallback(BATCH))
    trainer.add_callback(loggers)
    trainer.train()
    rates = loggers.rates
    assert len(rates) == 12 // logging_steps
    # a step makes its batch (0.1 s) and runs it (0.02 s): 16.7 samples/s at most; evaluation would pull it far lower
    # (about 3 in the first window of the second case), leaving out the batch-making far higher (about 100). The first
    # step also sets the trainer up, so its window is only held to "no evaluation in it".
    assert 5 < rates[0] < 17.5 and all(11 < rate < 17.5 for rate in rates[1:]), rates
