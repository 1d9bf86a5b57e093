"""`SeraDPOTrainer`: OpenRLHF's DPOTrainer with a swappable DAA loss, cached reference log-probs, per-pair
weights and NLL coefficients, and a guard that stops on a non-finite loss before the step is applied.

Differences from the stock `fit` loop, and why:
- the loss is `sera_openrlhf.losses` (per-example, with lengths for SimPO/R-DPO) instead of `DPOLoss`;
- reference log-probs come from `ref_logps(indices)` (the cache) when given, so the reference never runs per
  step; reference-free losses (SimPO) never touch a reference at all;
- each pair's loss is multiplied by its weight (soft selection) and bootstrapped pairs can carry an NLL term;
- with `packed=True` (--sera.packed_train) the policy's log-probs come from the scoring engine's packed layout
  (a pair's prompt once, the LM head on response positions only): the same loss up to float rounding;
- every optimizer step is appended to `step_logs` (and `<output_dir>/train_log.jsonl` by the caller) and
  announced as the `events` point `<phase>:step<n>`;
- every pair's implicit rewards in the forward that trains on it (before that step's update) are appended to
  `pair_margins` (`<output_dir>/train_margins.jsonl`): in the first epoch a policy that has not seen the pair
  yet scores it, a free out-of-sample review (--sera.review_refit prequential).
Logging, evaluation and checkpointing reuse the stock `save_logs_and_checkpoints`.

OpenRLHF 0.11.2 computes the loss inline in `DPOTrainer.fit`, with no narrower hook, so `fit` and `evaluate`
are copies of the stock ones with the changes above. tests/test_trainer_parity.py pins the copy: with the `dpo`
loss, a real reference model, weights 1 and NLL coefficients 0, `SeraDPOTrainer.fit` must give the stock
`DPOTrainer.fit`'s per-step losses and final parameters exactly. Re-check it (and re-copy) on an OpenRLHF upgrade.
"""

from __future__ import annotations

import torch
from openrlhf.trainer.dpo_trainer import DPOTrainer
from openrlhf.utils.distributed_sampler import DistributedSampler
from tqdm import tqdm

from sera_openrlhf import events
from sera_openrlhf.errors import NonFiniteError
from sera_openrlhf.losses import DAALoss, PreferenceBatch, soft_label_losses
from sera_openrlhf.scoring import SequenceItem, actor_logprob_fn, packed_train_logps, packed_usable


def response_lengths(att_masks: torch.Tensor, prompt_id_lens) -> torch.Tensor:
    """Number of response tokens per row, counted exactly as `DPOTrainer._get_batch_logps` masks them. [2B]"""
    mask = att_masks.clone().bool()
    for row, n in zip(mask, prompt_id_lens):
        row[:n] = False
    return mask[:, 1:].sum(-1)


class SeraDPOTrainer(DPOTrainer):
    def __init__(self, *, daa_loss: DAALoss, train_dataset, ref_logps=None, packed: bool = False, **stock_kwargs):
        super().__init__(**stock_kwargs)
        self.daa_loss = daa_loss
        self.train_dataset = train_dataset
        self.ref_logps = ref_logps  # callable(dataset, LongTensor indices) -> (chosen [B], rejected [B]) or None
        self.step_logs: list[dict] = []
        self.pair_margins: list[dict] = []  # per pair per training forward, this rank's (record_margins)
        # --sera.packed_train: the scoring engine's packed layout (None where it does not apply; see policy_logps)
        self.packed = None
        if packed and not self.aux_loss:
            self._stock_logprob_fn = actor_logprob_fn(self.model, ring_attn_group=self.strategy.ring_attn_group)
            self.packed = getattr(self._stock_logprob_fn, "packed", None)

    # -- policy log-probs -----------------------------------------------------------------------------------

    def policy_logps(self, chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens):
        """(logp_sum [2B], logp_mean [2B], lengths [2B], model output or None), chosen rows first, with gradients.

        Stock: one forward of the concatenated, right-padded chosen + rejected rows (DPOTrainer's). Packed
        (--sera.packed_train): each pair's prompt once, its two responses after it under a 4-D mask, the LM head
        on response positions only; checked once against the stock forward on this run's first batch."""
        if self.packed is not None and not self.packed.disabled:
            items = [SequenceItem(ids[m.bool()], int(p)) for ids, m, p in
                     zip([*chosen_ids, *reject_ids], [*c_mask, *r_mask], [*prompt_id_lens, *prompt_id_lens])]
            pad = self.tokenizer.pad_token_id
            if packed_usable(self.packed, self._stock_logprob_fn, items, pad):
                logp_sum, lengths = packed_train_logps(self.packed, items, pad)
                return logp_sum, logp_sum / lengths, lengths.to(logp_sum.dtype), None
        input_ids, att_masks, plens = self.concatenated_inputs(chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens)
        log_probs, output = self.model(
            input_ids, attention_mask=att_masks, return_output=True, return_logprobs=True,
            ring_attn_group=self.strategy.ring_attn_group,
        )
        logp_sum, logp_mean = self._get_batch_logps(log_probs, att_masks, plens)
        return logp_sum, logp_mean, response_lengths(att_masks, plens).to(logp_sum.dtype), output

    # -- one batch ------------------------------------------------------------------------------------------
    def batch_loss(self, data, dataset):
        chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens, indices = data
        device = next(self.model.parameters()).device
        chosen_ids, c_mask = chosen_ids.squeeze(1).to(device), c_mask.squeeze(1).to(device)
        reject_ids, r_mask = reject_ids.squeeze(1).to(device), r_mask.squeeze(1).to(device)
        B = chosen_ids.shape[0]
        logp_sum, logp_mean, lengths, output = self.policy_logps(chosen_ids, c_mask, reject_ids, r_mask,
                                                                 prompt_id_lens)

        ref_c = ref_r = None
        if self.daa_loss.needs_reference:
            if self.ref_logps is not None:
                ref_c, ref_r = (t.to(device=device, dtype=logp_sum.dtype) for t in self.ref_logps(dataset, indices))
            else:
                with torch.no_grad():
                    ref_c, ref_r, _, _ = self.concatenated_forward(
                        self.ref_model, chosen_ids, c_mask, reject_ids, r_mask, prompt_id_lens
                    )
        out = soft_label_losses(self.daa_loss, PreferenceBatch(
            policy_chosen_logps=logp_sum[:B], policy_rejected_logps=logp_sum[B:],
            reference_chosen_logps=ref_c, reference_rejected_logps=ref_r,
            chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        ), dataset.confidences[indices].to(device=device))
        weights = dataset.weights[indices].to(device=device, dtype=out.losses.dtype)
        nll_coefs = dataset.nll_coefs[indices].to(device=device, dtype=out.losses.dtype)
        preference_loss = (out.losses * weights).mean()
        chosen_nll = -logp_mean[:B]  # per-token NLL of each chosen response
        loss = preference_loss + (nll_coefs * chosen_nll).mean()
        if self.nll_loss:
            loss = loss + chosen_nll.mean() * self.args.model.nll_loss_coef
        if self.aux_loss and output is not None and "aux_loss" in output:
            loss = loss + output.aux_loss * self.args.model.aux_loss_coef
        return loss, preference_loss, out, chosen_nll, lengths

    def record_margins(self, indices, out, lengths, epoch, step):
        """Each pair's implicit rewards in the forward that trains on it, i.e. under the policy before this step's
        update: in the first epoch a policy that has not seen the pair (the prequential review)."""
        B = len(indices)
        cols = [x.detach().double().cpu().tolist() for x in
                (out.chosen_rewards, out.rejected_rewards, lengths[:B], lengths[B:])]
        for i, (rc, rr, lc, lr) in zip(indices.tolist(), zip(*cols)):
            self.pair_margins.append({"id": self.train_dataset.ids[int(i)], "epoch": epoch, "micro_step": step,
                                      "chosen_reward": rc, "rejected_reward": rr, "chosen_len": int(lc),
                                      "rejected_len": int(lr)})

    def _check_finite(self, loss, global_step):
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
        if self.strategy.all_reduce(bad, op="max").item() > 0:  # every rank stops together
            raise NonFiniteError(
                f"non-finite loss at global step {global_step}: the step was not applied. Lower --adam.lr, check "
                "the data for empty or extreme responses, or use --ds.param_dtype fp32; rerun the same command to "
                "resume from the last finished phase."
            )

    # -- training loop (stock structure: epochs, consumed_samples resume, accumulation-aware logging) -----------
    def fit(self, args, consumed_samples=0, num_update_steps_per_epoch=None):
        if num_update_steps_per_epoch is None:
            num_update_steps_per_epoch = len(self.train_dataloader)
        if num_update_steps_per_epoch <= 0:
            raise ValueError(
                f"num_update_steps_per_epoch must be positive, got {num_update_steps_per_epoch}: the dataset "
                f"({len(self.train_dataset)} pairs) is smaller than --train.batch_size"
            )
        if args.eval.steps == -1:
            args.eval.steps = num_update_steps_per_epoch
        if args.ckpt.save_steps == -1:
            args.ckpt.save_steps = float("inf")

        step = consumed_samples // args.train.batch_size * self.strategy.accumulated_gradient + 1
        start_epoch = consumed_samples // args.train.batch_size // num_update_steps_per_epoch
        consumed_samples = consumed_samples % (num_update_steps_per_epoch * args.train.batch_size)
        acc_sum = loss_sum = 0.0
        for epoch in range(start_epoch, self.epochs):
            if isinstance(self.train_dataloader.sampler, DistributedSampler):
                self.train_dataloader.sampler.set_epoch(
                    epoch, consumed_samples=0 if epoch > start_epoch else consumed_samples
                )
            step_bar = tqdm(range(len(self.train_dataloader)), desc=f"Train step of epoch {epoch}",
                            disable=not self.strategy.is_rank_0())
            self.model.train()
            if self.ref_model is not None:
                self.ref_model.eval()
            for data in self.train_dataloader:
                loss, preference_loss, out, chosen_nll, lengths = self.batch_loss(data, self.train_dataset)
                self._check_finite(loss, step // self.strategy.accumulated_gradient)
                self.record_margins(data[5], out, lengths, epoch, step)
                self.strategy.backward(loss, self.model, self.optimizer)
                self.strategy.optimizer_step(self.optimizer, self.model, self.scheduler)

                acc = (out.chosen_rewards > out.rejected_rewards).float().mean().item()
                acc_sum += acc
                loss_sum += preference_loss.item()
                logs_dict = {
                    "loss": preference_loss.item(),
                    "acc": acc,
                    "chosen_reward": out.chosen_rewards.mean().item(),
                    "reject_reward": out.rejected_rewards.mean().item(),
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": self.strategy.get_grad_norm(self.model),
                    "chosen_nll": chosen_nll.mean().item(),
                }
                logs_dict = self.strategy.all_reduce(logs_dict)
                step_bar.set_postfix(logs_dict)
                step_bar.update()
                if step % self.strategy.accumulated_gradient == 0:
                    logs_dict["loss_mean"] = loss_sum / self.strategy.accumulated_gradient
                    logs_dict["acc_mean"] = acc_sum / self.strategy.accumulated_gradient
                    loss_sum = acc_sum = 0.0
                    global_step = step // self.strategy.accumulated_gradient
                    self.step_logs.append({"global_step": global_step, "epoch": epoch, **logs_dict})
                    events.emit(f"{events.current_phase}:step{global_step}")
                    client_states = {"consumed_samples": global_step * args.train.batch_size}
                    self.save_logs_and_checkpoints(args, global_step, step_bar, logs_dict, client_states)
                step += 1

        if self._wandb is not None and self.strategy.is_rank_0():
            self._wandb.finish()
        if self._tensorboard is not None and self.strategy.is_rank_0():
            self._tensorboard.close()

    def evaluate(self, eval_dataloader, steps=0):
        self.model.eval()
        acc_sum = loss_sum = margin_sum = 0.0
        n = 0
        with torch.no_grad():
            for data in tqdm(eval_dataloader, desc=f"Eval stage of global_step {steps}",
                             disable=not self.strategy.is_rank_0()):
                _, preference_loss, out, _, _ = self.batch_loss(data, eval_dataloader.dataset)
                b = out.chosen_rewards.numel()
                acc_sum += (out.chosen_rewards > out.rejected_rewards).sum().item()
                margin_sum += (out.chosen_rewards - out.rejected_rewards).sum().item()
                loss_sum += preference_loss.item() * b
                n += b
        logs = self.strategy.all_reduce({"eval_loss": loss_sum / max(n, 1), "acc_mean": acc_sum / max(n, 1),
                                         "margin": margin_sum / max(n, 1)})
        if self.strategy.is_rank_0():
            if self._wandb is not None:
                self._wandb.log({**{f"eval/{k}": v for k, v in logs.items()}, "eval/global_step": steps})
            elif self._tensorboard is not None:
                for k, v in logs.items():
                    self._tensorboard.add_scalar(f"eval/{k}", v, steps)
        self.model.train()
        return logs
