"""Training on samples of a tiny random target lowers the loss and raises simulated acceptance."""
import torch


def test_training_reduces_loss_and_raises_acceptance(trained):
    _, _, rec = trained
    before, after, losses, st = rec["before"], rec["after"], rec["losses"], rec["status"]
    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.3f}; step accept {before['step_accept']} -> "
          f"{after['step_accept']}; accept_length {before['accept_length']:.3f} -> {after['accept_length']:.3f}; "
          f"greedy {before['greedy_accept_length']:.3f} -> {after['greedy_accept_length']:.3f}; "
          f"{st['tokens_per_second']:.0f} tok/s; train acc {st['acc_per_step']}")
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert after["step_accept"][0] > 1.7 * before["step_accept"][0]  # 0.10 -> 0.22 when measured
    assert after["accept_length"] > before["accept_length"] + 0.08
    assert after["greedy_accept_length"] > before["greedy_accept_length"] + 0.2
    assert st["steps"] == len(losses) and len(st["loss_per_step"]) == 3
    assert torch.isfinite(torch.tensor(st["loss_per_step"])).all()
