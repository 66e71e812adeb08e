"""Network and Trainer used from several Python threads at once (issue 14). Each object has a lock in
C, so calls on one object never run at once: Network calls wait for each other, a Trainer call that
computes is refused ("busy") while another runs. Every call that runs gets exactly what a lone call
gets. Without the locks the threads share the inference plan's and the training graph's activation
arenas and overwrite each other's tensors."""
import threading
import time

import numpy as np
import pytest

from deepspot_napari import _core, bundled_weights_path

THREADS = 4


def hammer(work, rounds):
    """Runs work(thread, round) from THREADS threads started together; returns {(thread, round): result}
    and re-raises the first exception a thread met."""
    start = threading.Barrier(THREADS)
    results, errors = {}, []

    def run(thread):
        start.wait()
        try:
            for r in range(rounds):
                results[thread, r] = work(thread, r)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def network():
    return _core.Network(str(bundled_weights_path()))


def retry_while_busy(call, *args):
    while True:
        try:
            return call(*args)
        except RuntimeError as e:
            if "busy" not in str(e):
                raise
            time.sleep(0.001)


def batches(rng, size, channels=None):
    shape = (2, size, size) if channels is None else (2, size, size, channels)
    return [rng.random(shape, dtype=np.float32) for _ in range(THREADS)]


def test_network_calls_from_threads_get_what_lone_calls_get(network, rng):
    # Each thread its own input; two shapes and two stage ranges, so plans are built while others run.
    images = batches(rng, 48, 1)
    features = batches(rng, 8, 384)
    expect = [(network.forward(x), network.forward(f, 1, 2)) for x, f in zip(images, features)]
    count = network.num_parameters

    def work(thread, r):
        if r % 2:
            return network.forward(features[thread], 1, 2), network.num_parameters
        return network.forward(images[thread]), _core.Trainer(network).step_count if r == 2 else 0

    for (thread, r), (y, other) in hammer(work, rounds=4).items():
        np.testing.assert_allclose(y, expect[thread][r % 2], rtol=1e-5, atol=1e-6)
        assert other == (count if r % 2 else 0)


def test_trainer_calls_from_threads_get_what_lone_calls_get(network, rng):
    trainer = _core.Trainer(network)
    images, targets = batches(rng, 32), [(t > 0.99).astype(np.float32) for t in batches(rng, 32)]
    expect = [(trainer.evaluate(x, t), trainer.gradients(x, t)) for x, t in zip(images, targets)]

    def work(thread, r):
        x, t = images[thread], targets[thread]
        if r % 2:
            return retry_while_busy(trainer.gradients, x, t), retry_while_busy(trainer.get, "head.conv.bias")
        return retry_while_busy(trainer.evaluate, x, t), trainer.names

    head_bias = trainer.get("head.conv.bias")
    for (thread, r), (got, other) in hammer(work, rounds=4).items():
        (pred, loss), gradient_loss = expect[thread]
        if r % 2:
            np.testing.assert_allclose(got, gradient_loss, rtol=1e-5)
            assert np.array_equal(other, head_bias)
        else:
            np.testing.assert_allclose(got[0], pred, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got[1], loss, rtol=1e-5)
            assert other == trainer.names

    # Steps from every thread: each one that runs is counted once.
    hammer(lambda thread, r: retry_while_busy(trainer.step, images[thread], targets[thread]), rounds=2)
    assert trainer.step_count == 2 * THREADS
