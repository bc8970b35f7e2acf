"""Packed batches: every token of an epoch once, per-document losses as if alone, and the same
global batches on any process count (resumed across a change of process count)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.config import ModelConfig
from research.data.packing import DocumentIndex, PackedBatches
from research.models import Transformer
from research.models.loss import packed_targets, token_losses


def _docs(n=60, seed=0, longest=45):
    rng = np.random.default_rng(seed)  # doc d holds d*1000 + 0, 1, 2, ...: each token unique
    return [d * 1000 + np.arange(rng.integers(1, longest)) for d in range(n)]


def _index(docs):
    half = len(docs) // 2  # two shards, as a prepared corpus has
    a, b = DocumentIndex.of_documents(docs[:half]), DocumentIndex.of_documents(docs[half:])
    return DocumentIndex(a._tokens + b._tokens, a._offsets + b._offsets)


def test_an_epoch_holds_every_token_once_in_whole_document_pieces():
    docs = _docs()
    loader = PackedBatches(_index(docs), seq_len=16, global_batch=4, seed=3)
    stream = []
    while loader.state["epoch"] == 0:
        batch = next(loader)
        for tokens, segments in zip(batch["tokens"], batch["segment_ids"], strict=True):
            for s in range(1, segments.max() + 1):
                piece = tokens[segments == s]
                assert np.all(np.diff(piece) == 1)  # one contiguous piece of one document
                stream.append(piece)
            assert np.all(np.diff(segments[segments > 0]) >= 0)  # padding only at the end
    total = sum(len(d) for d in docs)
    epoch0 = np.concatenate(stream)[:total]
    assert sorted(epoch0.tolist()) == sorted(np.concatenate(docs).tolist())
    assert len(np.unique(epoch0 // 1000)) == len(docs)
    pieces = [p for p in stream if len(p) == len(docs[p[0] // 1000]) and p[0] % 1000 == 0]
    assert len(pieces) >= len([d for d in docs if len(d) <= 17]) * 0.9  # short ones stay whole


def test_the_global_batches_do_not_depend_on_the_process_count_or_a_resume_across_counts():
    index = _index(_docs(seed=1))

    def steps(count, n, state=None):
        loaders = [PackedBatches(index, 16, 4, seed=5, process_index=p, process_count=count)
                   for p in range(count)]  # fmt: skip
        out = []
        for loader in loaders:
            if state:
                loader.set_state(state)
        for _ in range(n):
            parts = [next(loader) for loader in loaders]
            out.append(np.concatenate([p["tokens"] for p in parts]))
            states = {tuple(sorted(loader.get_state().items())) for loader in loaders}
            assert len(states) == 1  # every process holds the same global position
        return out, loaders[0].get_state()

    whole, _ = steps(1, 12)
    first, state = steps(2, 5)  # 2 processes, checkpoint, resume on 1
    rest, _ = steps(1, 7, state)
    np.testing.assert_array_equal(np.stack(first + rest), np.stack(whole))
    first, state = steps(1, 5)  # 1 process, resume on 2 (and on 4)
    for count in (2, 4):
        rest, _ = steps(count, 7, state)
        np.testing.assert_array_equal(np.stack(first + rest), np.stack(whole))


def test_a_packed_batchs_per_document_losses_equal_each_document_alone():
    # test_model's tiny shape: in the whole suite its parameter initialisers are compiled already
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, seq_len=16).resolved()
    model = Transformer(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 50, rng.integers(2, 12)) for _ in range(16)]
    batch = next(PackedBatches(DocumentIndex.of_documents(docs), 16, 4, seed=0))
    pieces = []
    for row in range(4):
        seg = batch["segment_ids"][row]
        pieces += [batch["tokens"][row][seg == s] for s in range(1, seg.max() + 1)]
    # Each piece alone, right-padded (causal: what follows it changes nothing), as one segment;
    # in the same call as the packed rows, so one compiled program serves both.
    alone = {
        "tokens": np.zeros((len(pieces), 17), np.int32),
        "segment_ids": np.ones((len(pieces), 17), np.int32),
    }
    for i, piece in enumerate(pieces):
        alone["tokens"][i, : len(piece)] = piece
    both = {k: jnp.asarray(np.concatenate([batch[k], alone[k]])) for k in batch}
    inputs, targets, segments, weights = packed_targets(both)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, t, s: nnx.merge(graphdef, p).forward(t, segment_ids=s)[0])
    logits = forward(params, inputs, segments)
    losses = np.asarray(token_losses(logits, targets)[0])
    i = 0
    for row in range(4):
        seg = batch["segment_ids"][row]
        for s in range(1, seg.max() + 1):
            packed = losses[row][seg[:-1] == s][: len(pieces[i]) - 1]
            np.testing.assert_allclose(packed, losses[4 + i, : len(pieces[i]) - 1], atol=2e-5)
            i += 1
    assert len(pieces) >= 6 and sum(len(p) for p in pieces) > 50


@pytest.mark.slow  # two tiny training runs (~1 min on 2 cores); the loader tests above are fast
def test_training_on_a_streamed_corpus_resumes_with_the_same_losses(tmp_path, tiny_config):
    import json

    from conftest import read_metrics

    from research.run import train

    folder = tmp_path / "corpus"
    folder.mkdir()
    from research.data.corpus import resolve_corpus

    text = resolve_corpus("tinyshakespeare")[0].read_text()
    docs = [d for d in text.split("\n\n") if d.strip()][:1500]
    for i in range(3):
        with open(folder / f"p{i}.jsonl", "w") as handle:
            handle.writelines(json.dumps({"text": d}) + "\n" for d in docs[i::3])
    stream = [f"data.sources={folder}", "data.tokenizer=bpe", "data.bpe_vocab_size=300",
              "data.workers=1", "train.steps=20", "train.checkpoint_every=10",
              "train.eval_every=10", "train.sample_tokens=0"]  # fmt: skip
    whole = train(tiny_config(*stream, f"train.run_dir={tmp_path / 'whole'}"))
    # A run stopped after its step-10 checkpoint: that checkpoint alone, then resumed.
    import shutil

    stopped = tmp_path / "stopped"
    shutil.copytree(whole.run_dir / "checkpoints" / "10", stopped / "checkpoints" / "10")
    shutil.copy(whole.run_dir / "config.json", stopped / "config.json")
    resumed = train(tiny_config(*stream, f"train.run_dir={stopped}"))
    assert resumed.steps_run == 10
    a, b = read_metrics(whole.run_dir), read_metrics(resumed.run_dir)
    for step in (15, 20):
        assert a[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-6)
    assert whole.val_bpb and 0 < whole.val_bpb < 8


def test_eval_rows_hold_every_token_once_in_order_and_eval_batches_cuts_them():
    from research.data.packing import packed_eval_batches

    docs = _docs(n=30)
    batches = list(packed_eval_batches(_index(docs), 16, batch_size=4, padded_rows=6))
    stream = []
    for batch, rows in batches:
        assert batch["tokens"].shape == (6, 17) and not batch["segment_ids"][rows:].any()
        seg = batch["segment_ids"][:rows]
        stream += batch["tokens"][:rows][seg > 0].tolist()
    assert stream == np.concatenate(docs).tolist()  # in stored order, nothing lost or repeated
    first = list(packed_eval_batches(_index(docs), 16, batch_size=4, max_batches=2))
    assert len(first) == 2 and all((a[0]["tokens"] == b[0]["tokens"][:4]).all()
                                   for a, b in zip(first, batches, strict=False))  # fmt: skip


def test_streamed_eval_loss_equals_each_document_scored_alone_from_the_whole_array(tmp_path):
    """The evaluator reads a streamed corpus' validation shards lazily as packed rows; the
    reference reads the split as one array, cuts it into documents at the stored offsets
    (pieces of at most seq_len + 1 = 33 tokens, as packing splits them) and scores each alone."""
    import json

    from research.config import DataConfig, MeshConfig
    from research.data.packing import rows_in_order
    from research.data.stream import StreamData, StreamPrepared, prepare_stream
    from research.infer.evaluate import Evaluator
    from research.parallel.mesh import make_mesh

    rng = np.random.default_rng(0)
    words = "the of and to in a is that for it as was with be by on not he this".split()
    (tmp_path / "c").mkdir()
    with open(tmp_path / "c" / "docs.jsonl", "w") as handle:
        for d in range(200):
            text = " ".join(rng.choice(words, rng.integers(1, 6) if d % 10 else 30)) + f" doc{d}"
            handle.write(json.dumps({"text": text}) + "\n")
    cfg = DataConfig(sources=str(tmp_path / "c"), tokenizer="bpe", bpe_vocab_size=200,
                     shard_tokens=300, cache_dir=str(tmp_path / "cache"), workers=1,
                     val_fraction=0.3)  # fmt: skip
    data = StreamPrepared(StreamData.open(prepare_stream(cfg, verbose=False)))
    assert len(data.stream.shards("val")) > 1  # the rows cross shard boundaries
    model_cfg = ModelConfig(vocab_size=data.vocab_size, d_model=32, n_layers=2, n_heads=4,
                            seq_len=32).resolved()  # fmt: skip
    graphdef, params = nnx.split(Transformer(model_cfg, nnx.Rngs(0)))
    # Sharpened weights: at initialisation every token's loss is close to log(vocab), which
    # would hide attention across documents; scaled up, the context matters.
    params = jax.tree.map(lambda w: w * 4, params)
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    loss, _ = Evaluator(graphdef, data, mesh, seq_len=32, micro_batch=4)(params)

    whole = data.tokens("val")
    shards = data.stream.shards("val")
    bases = np.concatenate([[0], np.cumsum([s["tokens"] for s in shards])[:-1]])
    starts = np.concatenate(
        [data.stream.offsets(s)[:-1] + base for s, base in zip(shards, bases, strict=True)]
    )
    bounds = np.append(starts, len(whole))
    pieces = [whole[a:b][i : i + 33] for a, b in zip(bounds[:-1], bounds[1:], strict=True)
              for i in range(0, b - a, 33)]  # fmt: skip
    padded = np.zeros((len(pieces), 33), np.int32)
    for i, piece in enumerate(pieces):
        padded[i, : len(piece)] = piece
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, padded[:, :-1])
    losses = np.asarray(token_losses(logits, jnp.asarray(padded[:, 1:]))[0], np.float64)
    counted = [losses[i, : len(p) - 1] for i, p in enumerate(pieces)]
    reference = np.concatenate(counted).mean()
    assert loss == pytest.approx(reference, rel=1e-5)
    assert sum(len(p) for p in pieces) == len(whole) > 33 * 20 and max(map(len, pieces)) == 33
    rows = list(rows_in_order(DocumentIndex.of_stream(data.stream, "val"), 32))
    assert sum(len(r) > 1 for r in rows) >= 10  # rows holding several documents
