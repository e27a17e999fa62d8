"""A user-written objective for tests/test_objectives.py: loaded as ``objective_plugin:make``."""

from __future__ import annotations

import torch

from nestprune.objectives.base import token_nll

CALLS: list[tuple] = []
NOT_CALLABLE = 42


class FirstWords:
    """CE of every token of the first line of the data file, repeated ``options['copies']`` times."""

    name = "first-words"

    def __init__(self, ids: torch.Tensor, copies: int):
        self.ids = ids
        self.copies = copies

    def batches(self, batch_size: int):
        for _ in range(self.copies):
            yield {"input_ids": self.ids[None]}

    def loss(self, model, batch):
        return token_nll(model, batch["input_ids"], batch["input_ids"]).sum() / self.copies

    def provenance(self):
        return {"tokens": int(self.ids.numel()), "copies": self.copies}


def make(tokenizer, data_path, options):
    CALLS.append((data_path, dict(options)))
    line = data_path.read_text().splitlines()[0]
    ids = torch.tensor(tokenizer(line)["input_ids"], dtype=torch.long)
    return FirstWords(ids, int(options.get("copies", 1)))


def not_an_objective(tokenizer, data_path, options):
    return {"name": "dict"}


def wrong_signature(tokenizer):
    return None
