"""Routing statistics of a LayerMoE model on held-out text, per layer and language.

- `expert0_share`: share of a language's tokens whose highest-weight route is expert 0 (the original FFN), with
  classifier routing as the model is configured — what stage 2 should raise for old languages;
- `expert_load`: each expert's share of the language's routes (top-k slots, unused slots excluded);
- `classifier_accuracy`: on classifier layers, the share of tokens whose predicted group is the language's group.

Padding positions are excluded; every real token counts once (evaluation never drops a token).
Shape letters (`layermoe_ds/__init__.py`): T tokens, K routes per token, G language groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


class RoutingStats:
    def __init__(self, groups: dict[str, int]):
        self.groups = groups  # language → its group index (0 = the original languages)
        self.counts: dict[int, dict[str, dict[str, torch.Tensor | int]]] = {}

    def update(self, model, lang: str, valid_T: torch.Tensor) -> None:
        """Add the routes of the last forward pass (read from each block's `aux`)."""
        for layer, block in model.moe_blocks().items():
            aux = block.aux
            ids_TK = aux.expert_ids_TK[valid_T.to(aux.expert_ids_TK.device)]
            entry = self.counts.setdefault(layer, {}).setdefault(
                lang, {"tokens": 0, "expert0": 0, "load": torch.zeros(block.num_experts, dtype=torch.long)}
            )
            entry["tokens"] += ids_TK.shape[0]
            entry["expert0"] += int((ids_TK[:, 0] == 0).sum())  # slots are ordered by weight
            routes = ids_TK[ids_TK >= 0].cpu()
            entry["load"] += torch.bincount(routes, minlength=block.num_experts)
            if aux.classifier_logits_TG is not None:
                predicted = aux.classifier_logits_TG[valid_T.to(aux.classifier_logits_TG.device)].argmax(dim=-1)
                entry["classifier_correct"] = entry.get("classifier_correct", 0) + int(
                    (predicted == self.groups[lang]).sum()
                )

    def all_reduce(self, device) -> None:
        """Sum the counts over ranks (each rank evaluated a share of the windows); on `device`, NCCL's or gloo's.
        A rank that saw no window of a language still takes part: the union of entries is agreed first."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        mine = {(layer, lang): len(e["load"]) for layer, langs in self.counts.items() for lang, e in langs.items()}
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        union = sorted({key: n for part in everyone for key, n in part.items()}.items())
        flat = []
        for (layer, lang), experts in union:
            entry = self.counts.get(layer, {}).get(lang)
            if entry is None:
                flat.append(torch.zeros(4 + experts, dtype=torch.float64))
                continue
            has_cls = "classifier_correct" in entry
            head = [entry["tokens"], entry["expert0"], entry.get("classifier_correct", 0), float(has_cls)]
            flat.append(torch.cat([torch.tensor(head, dtype=torch.float64), entry["load"].double()]))
        total = torch.cat(flat).to(device) if flat else torch.zeros(0, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        total, offset = total.cpu(), 0
        for (layer, lang), experts in union:
            values = total[offset : offset + 4 + experts]
            offset += 4 + experts
            entry = {"tokens": int(values[0]), "expert0": int(values[1]), "load": values[4:].long()}
            if values[3] > 0:
                entry["classifier_correct"] = int(values[2])
            self.counts.setdefault(layer, {})[lang] = entry

    def result(self) -> dict:
        """{"layers": {layer: {"tokens": {lang: n}, "expert0_share": {lang: x}, "expert_load": {lang: [..]},
        "classifier_accuracy": {lang: x}}}, "old_to_expert0": {layer: x}} (old = group 0, token-weighted)."""
        layers = {}
        old_to_expert0 = {}
        for layer, per_lang in sorted(self.counts.items()):
            row: dict[str, dict] = {"tokens": {}, "expert0_share": {}, "expert_load": {}}
            for lang, entry in per_lang.items():
                row["tokens"][lang] = entry["tokens"]
                tokens = max(entry["tokens"], 1)
                row["expert0_share"][lang] = entry["expert0"] / tokens
                total = max(int(entry["load"].sum()), 1)
                row["expert_load"][lang] = [int(n) / total for n in entry["load"]]
                if "classifier_correct" in entry:
                    row.setdefault("classifier_accuracy", {})[lang] = entry["classifier_correct"] / tokens
            layers[str(layer)] = row
            old = [e for lang, e in per_lang.items() if self.groups[lang] == 0]
            if old:
                old_to_expert0[str(layer)] = sum(e["expert0"] for e in old) / max(sum(e["tokens"] for e in old), 1)
        return {"layers": layers, "old_to_expert0": old_to_expert0}


def format_routing(routing: dict, old: Sequence[str], new: Sequence[str]) -> str:
    """One line per MoE layer: expert-0 share for old and new languages (token means over languages), classifier
    accuracy where the layer has one."""
    lines = [f"{'layer':<6} {'old→expert 0':>12} {'new→expert 0':>12} {'classifier acc':>14}"]
    for layer, row in routing["layers"].items():
        shares = row["expert0_share"]

        def mean(langs, values):
            vals = [values[lang] for lang in langs if lang in values]
            return sum(vals) / len(vals) if vals else float("nan")

        acc = row.get("classifier_accuracy")
        acc_text = f"{mean(list(acc), acc):>14.3f}" if acc else f"{'-':>14}"
        lines.append(f"{layer:<6} {mean(old, shares):>12.3f} {mean(new, shares):>12.3f} {acc_text}")
    return "\n".join(lines)
