"""Run by `accelerate launch --num_processes 2` in a test: tokenizer training as two processes."""

import json
import sys

import torch

from tokenline.tokenizer.model import TOKENIZER_SIZES
from tokenline.tokenizer.train import LossConfig, ShardImages, TrainConfig, train_tokenizer

shard_dir, out_dir, record = sys.argv[1:4]
torch.manual_seed(0)
model = TOKENIZER_SIZES["T"](image_size=32, num_tokens=16)
seen = []
original_iter = ShardImages.__iter__


def recording_iter(self):
    for image, key in original_iter(self):
        seen.append(key)
        yield image, key


ShardImages.__iter__ = recording_iter
config = TrainConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1,
                     loss=LossConfig(adversarial=0.5, adversarial_start=2))
result = train_tokenizer(model, shard_dir, out_dir, config)
from accelerate import PartialState  # noqa: E402

state = PartialState()
with open(f"{record}.{state.process_index}.json", "w") as handle:
    json.dump({"keys": seen[: 4 * 4], "num_processes": state.num_processes, "result": result}, handle)
