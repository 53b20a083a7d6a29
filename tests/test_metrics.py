"""The accumulating metrics (lmdm.eval.metrics): in pieces, across two processes, equal one pass."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmdm.eval.fad import frechet_distance
from lmdm.eval.metrics import ClapScore, FrechetAudioDistance, clap_scores, per_clip_fad


def _sets(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(300, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 5, generator=g, dtype=torch.float64) + 10.0
    fake = torch.randn(240, 5, generator=g, dtype=torch.float64) * 1.3 + 10.4
    return real, fake


def test_fad_accumulated_in_pieces_equals_one_pass() -> None:
    real, fake = _sets()
    metric = FrechetAudioDistance(dim=5)
    for piece in real.split(70):
        metric.update(piece.float(), real=True)
    for piece in fake.split(33):
        metric.update(piece, real=False)
    expected = frechet_distance(fake.float().double(), real.float().double())
    # Sums of outer products lose a few digits to a mean of 10 (on purpose here): 1e-7, not 1e-9.
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-7)
    metric.reset()
    with pytest.raises(RuntimeError, match="at least 2 rows"), pytest.warns(UserWarning, match="before the ``update``"):
        metric.compute()


def test_the_reference_survives_reset_when_asked() -> None:
    real, fake = _sets()
    metric = FrechetAudioDistance(dim=5, reset_real_features=False)
    metric.update(real, real=True)
    metric.update(real + 1.0, real=False)
    metric.reset()
    metric.update(fake, real=False)
    assert float(metric.compute()) == pytest.approx(frechet_distance(fake, real), rel=1e-9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        real, fake = _sets()
        fad, clap = FrechetAudioDistance(dim=5), ClapScore()
        fad.update(real[rank::2], real=True)  # each process sees half of every set
        fad.update(fake[rank::2], real=False)
        clap.update(fake[rank::2], real[: fake.shape[0]][rank::2])
        torch.save({"fad": fad.compute(), "clap": clap.compute()}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fad_and_clap_score_gathered_across_two_processes_equal_one_pass(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    real, fake = _sets()
    one_pass = frechet_distance(fake, real)
    one_clap = float(clap_scores(fake, real[: fake.shape[0]]).mean())
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert float(got["fad"]) == pytest.approx(one_pass, rel=1e-9)
        assert float(got["clap"]) == pytest.approx(one_clap, rel=1e-12)


def test_per_clip_fad_ranks_the_unlike_clip_last() -> None:
    real, _ = _sets()
    g = torch.Generator().manual_seed(3)
    like = real[torch.randperm(300, generator=g)[:80]]
    unlike = like + 3.0
    scores = per_clip_fad([like, unlike], real)
    assert scores[0] < scores[1] and scores[1] == pytest.approx(frechet_distance(unlike, real), rel=1e-9)
    with pytest.raises(ValueError, match="clip 1"):
        per_clip_fad([like, like[:1]], real)


def test_clap_scores_are_cosines_against_one_prompt_or_one_each() -> None:
    audio = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert clap_scores(audio, torch.tensor([1.0, 0.0])).tolist() == pytest.approx([1.0, 0.0, 2**-0.5])
    assert clap_scores(audio, -audio).tolist() == pytest.approx([-1.0, -1.0, -1.0])
    with pytest.raises(ValueError, match="one shape"):
        clap_scores(audio, torch.ones(2, 2))
