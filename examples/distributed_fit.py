"""
Fitting one path on several processes with torchrun
===================================================

``distributed=True`` fits with every process of a ``torch.distributed`` group. The
default continuous geodesic is data-parallel: a step takes one batch per rank, each
rank its own batch and ``t``, and the ranks add up the bends' gradients. The chain
(``curve="chain"``) is path-parallel: each rank optimises a block of its points, and
the ranks swap only their boundary points' logits. Either way every rank ends with the
same path. This script is not run by the documentation build (it needs several
processes); run it on the CPU with gloo::

    torchrun --standalone --nproc_per_node=2 examples/distributed_fit.py

or on one node with G GPUs (NCCL, one GPU per rank, ``cuda:LOCAL_RANK``)::

    torchrun --standalone --nproc_per_node=G examples/distributed_fit.py

Every rank runs the same script with the same models, data and ``random_state``;
only rank 0 prints.
"""

import torch
import torch.distributed as dist

from geoconnect import GeodesicConnector, LinearConnector
from geoconnect.models import load_digits_split, make_cnn, train_classifier

data = load_digits_split()
# Every rank trains the same two networks (same seeds); a real script would load them.
model_a, model_b = (
    train_classifier(make_cnn(seed=s), data.images_train, data.y_train, epochs=15, seed=s)
    for s in (1, 2)
)

curve = GeodesicConnector(random_state=0, distributed=True)  # data-parallel
curve.fit(data.images_train, model_a=model_a, model_b=model_b)
chain = GeodesicConnector(curve="chain", max_iter=30, random_state=0, distributed=True)
chain.fit(data.images_train, model_a=model_a, model_b=model_b)  # path-parallel

if dist.get_rank() == 0:
    line = LinearConnector().fit(data.images_train, model_a=model_a, model_b=model_b)
    for name, connector in (("linear", line), ("geodesic", curve), ("chain", chain)):
        evaluation = connector.evaluate(data.images_test, data.y_test)
        print(
            f"{name:9s} test loss barrier {evaluation.barrier:.4f} nats, "
            f"length {connector.length_:.3f}"
        )
    for name, connector in (("geodesic", curve), ("chain", chain)):
        seconds = sum(connector.history_["seconds"])
        sent = sum(v for k, v in connector.communication_.items() if k.endswith("_bytes"))
        print(
            f"{name}: {dist.get_world_size()} ranks, {connector.n_iter_} epochs in "
            f"{seconds:.1f} s, rank 0 sent {sent / 1e6:.1f} MB "
            f"({torch.get_num_threads()} thread(s) each)"
        )
dist.destroy_process_group()
