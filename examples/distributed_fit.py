"""
Fitting one path on several processes with torchrun
===================================================

``GeodesicConnector(curve="chain", distributed=True)`` splits the path's points across the
processes of a ``torch.distributed`` group: each rank optimises a block of the
interior, the ranks swap only their boundary points' logits at each step, and every
rank ends with the whole path — the single-process fit's. This script is not run by
the documentation build (it needs several processes); run it on the CPU with gloo::

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

geo = GeodesicConnector(curve="chain", max_iter=30, random_state=0, distributed=True)
geo.fit(data.images_train, model_a=model_a, model_b=model_b)

if dist.get_rank() == 0:
    line = LinearConnector().fit(data.images_train, model_a=model_a, model_b=model_b)
    for name, connector in (("linear", line), ("geodesic", geo)):
        evaluation = connector.evaluate(data.images_test, data.y_test)
        print(f"{name:9s} test loss barrier {evaluation.barrier:.4f} nats")
    seconds = sum(geo.history_["seconds"])
    print(
        f"{dist.get_world_size()} ranks, {geo.n_iter_} epochs in {seconds:.1f} s; every "
        f"rank holds all {len(geo.path_)} points ({torch.get_num_threads()} thread(s) each)"
    )
dist.destroy_process_group()
