"""
Saving and sharing paths
========================

A fitted path is tensors and a few facts about them.
[`path_.save(file)`][geoconnect.ModelPath.save] writes them to one
[safetensors](https://huggingface.co/docs/safetensors) file, which runs no code when
it is read and carries a digest of its content. Any process that has the model class
reads it back with [`ModelPath.load`][geoconnect.ModelPath.load] and takes out any
network along it with [`export`][geoconnect.ModelPath.export]. While a fit runs,
``GeodesicConnector(checkpoint=DIR)`` keeps its state on disk, so a fit killed
half-way can be resumed. More detail is on the [saving page](../../saving.md).
"""

# %%
# A geodesic to save
# ------------------
from geoconnect import GeodesicConnector
from geoconnect.models import load_digits_split, make_mlp, train_classifier

data = load_digits_split()
model_a = train_classifier(make_mlp(seed=1), data.X_train, data.y_train, seed=1)
model_b = train_classifier(make_mlp(seed=2), data.X_train, data.y_train, seed=2)

geodesic = GeodesicConnector(device="cpu", random_state=0)
geodesic.fit(data.X_train, model_a=model_a, model_b=model_b)
print(f"{geodesic.path_!r}, fitted in {geodesic.n_iter_} epochs")

# %%
# Save it
# -------
# ``metadata`` adds your own facts (anything JSON can hold) to what the connector
# already recorded: the divergence, the path's energy and its Fisher–Rao length on the
# fit data. The file is written to a temporary name and then renamed, so a crash
# during the write never leaves half a file behind.
import tempfile
from pathlib import Path

folder = Path(tempfile.mkdtemp())
file = geodesic.path_.save(
    folder / "digits-geodesic.safetensors", metadata={"seeds": [1, 2], "data": "digits"}
)
print(f"{file.name}: {file.stat().st_size / 1024:.0f} KiB")

# %%
# What the file holds, without the model class
# --------------------------------------------
# ``geoconnect info FILE`` checks the digest, then prints the record: the
# architecture (every module's class and every tensor's name, shape and dtype, and
# a fingerprint of them), the points' positions, the lengths and the metadata.
# ``--json`` prints the whole record instead.
import subprocess
import sys

command = [sys.executable, "-m", "geoconnect.cli", "info", file.name]  # = geoconnect info
info = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True)
print(f"$ geoconnect info {file.name}\n{info.stdout}")

# %%
# Load it in a fresh Python process
# ---------------------------------
# The other process needs the file and the model class, nothing else. The template
# is a new instance of the class: its values are not used, only its architecture,
# which is checked against the file. ``export(0.5)`` is the network half-way along
# the path by arc length (between two points, interpolated). It is an ordinary
# module, and its ``state_dict`` loads into the process's own ``make_mlp()``.
# ``device="cuda"`` would load the same file onto a GPU.
import json

import torch

load_script = f"""
import json, torch
import torch.nn.functional as F
from geoconnect import ModelPath
from geoconnect.models import load_digits_split, make_mlp

path = ModelPath.load({str(file)!r}, template=make_mlp(), device="cpu")
print(path)
mine = make_mlp()
mine.load_state_dict(path.export(0.5).state_dict())

data = load_digits_split()
X, y = torch.as_tensor(data.X_test), torch.as_tensor(data.y_test)
with torch.no_grad():
    logits = mine.eval()(X)
loss = F.cross_entropy(logits, y).item()
accuracy = (logits.argmax(1) == y).float().mean().item()
print(f"midpoint: test accuracy {{accuracy:.1%}}, test loss {{loss:.4f}} nats")
print(json.dumps({{"test_loss": loss, "test_accuracy": accuracy}}))
"""
child = subprocess.run(
    [sys.executable, "-c", load_script], capture_output=True, text=True, check=True
)
print(child.stdout)
midpoint = json.loads(child.stdout.splitlines()[-1])

# %%
# The loaded path computes what the fitted one does
# -------------------------------------------------
# Loaded in this process, the path's logits equal the original's exactly (same
# device, same arithmetic), and its positions and metadata come back too.
from geoconnect import ModelPath

loaded = ModelPath.load(file, template=make_mlp())
x = torch.as_tensor(data.X_test)
print("logits equal:", torch.equal(loaded.logits(x), geodesic.path_.logits(x)))
print("positions equal:", (loaded.t_ == geodesic.path_.t_).all())
print("metadata:", loaded.metadata)

# %%
# The midpoint on the path's loss profile
# ---------------------------------------
# The test loss of the loaded path's 25 points, and the midpoint the other process
# exported. The midpoint's ``t = 0.5`` is measured by arc length on the fit data;
# the horizontal axis is ``i / (N − 1)``, so the marker sits where ``t_`` crosses 0.5.
import numpy as np

from geoconnect.evaluation import evaluate_path
from geoconnect.plotting import plot_loss_profile

test = evaluate_path(loaded, data.X_test, data.y_test)
ax = plot_loss_profile({"loaded path": test}, title="Test loss along the loaded geodesic")
where = np.interp(0.5, loaded.t_, test.t)
ax.plot(where, midpoint["test_loss"], "o", color="black", label="export(0.5), other process")
ax.legend(loc="best", fontsize="small")

# %%
# Pickling
# --------
# A fitted connector pickles too, with its tensors moved to the CPU, so that one
# fitted on a GPU unpickles anywhere. But reading a pickle runs code: unpickle only
# files you made yourself or trust, such as joblib's copies in a grid search. To
# share a path, send the safetensors file.
import pickle

restored = pickle.loads(pickle.dumps(geodesic))
same = restored.score(data.X_test, data.y_test) == geodesic.score(data.X_test, data.y_test)
print(f"unpickled: {restored.path_!r}; same score: {same}")

# %%
# A checkpointed fit, killed and resumed
# --------------------------------------
# With ``checkpoint=DIR`` the fit rewrites ``DIR/checkpoint.safetensors`` after every
# epoch with its whole state: the path, Adam's moments, the random generators, the
# early-stopping counters and the history. Here another process runs the same fit as
# above with a checkpoint, and is killed (SIGKILL, with no chance to clean up) once it
# prints epoch 8. It takes the two ends from the saved file, which holds them bit for
# bit. Bitwise equality on the CPU needs the same arithmetic, so the other process
# uses as many threads as this one.
checkpoint = folder / "checkpoint"
fit_script = f"""
import torch
torch.set_num_threads({torch.get_num_threads()})
from geoconnect import GeodesicConnector, ModelPath
from geoconnect.models import load_digits_split, make_mlp

ends = ModelPath.load({str(file)!r}, template=make_mlp())
data = load_digits_split()
connector = GeodesicConnector(
    device="cpu", random_state=0, checkpoint={str(checkpoint)!r}, verbose=2
)
connector.fit(data.X_train, model_a=ends.export(0), model_b=ends.export(-1))
"""
child = subprocess.Popen(
    [sys.executable, "-u", "-c", fit_script], stdout=subprocess.PIPE, text=True
)
for line in child.stdout:
    if line.split()[:2] == ["epoch", "8"]:
        child.kill()
        print(f"killed after: {line}", end="")
        break
child.wait()
child.stdout.close()
print(f"exit status {child.returncode}")

# %%
# The checkpoint holds the state after the last epoch whose checkpoint was written
# before the kill. [`file_info`][geoconnect.persistence.file_info] reads its record.
from geoconnect.persistence import file_info

record = file_info(checkpoint / "checkpoint.safetensors")
done = len(record["state"]["history"]["energy"])
print(f"checkpoint: {done} complete epochs, {record['bytes'] / 1024:.0f} KiB")

# %%
# A fit in this process with the same directory, models, data and parameters picks
# up from there. ``verbose``, ``device`` and ``checkpoint`` may differ; nothing else
# may. It runs only the remaining epochs and ends with the uninterrupted fit's path.
resumed = GeodesicConnector(device="cpu", random_state=0, checkpoint=checkpoint)
resumed.fit(data.X_train, model_a=model_a, model_b=model_b)
print(
    f"resumed: {resumed.n_iter_ - done} more epochs, n_iter_ = {resumed.n_iter_} "
    f"(the uninterrupted fit: {geodesic.n_iter_})"
)
same_path = torch.equal(resumed.path_.parameters_vector(), geodesic.path_.parameters_vector())
print("same path, bit for bit:", same_path)
print("same energies:", resumed.history_["energy"] == geodesic.history_["energy"])

# %%
# A checkpoint belongs to one fit. A fit whose parameters, models or data differ is
# refused, with a message naming the difference, and the checkpoint is left as it
# was. Give each fit its own directory.
try:
    GeodesicConnector(device="cpu", random_state=1, checkpoint=checkpoint).fit(
        data.X_train, model_a=model_a, model_b=model_b
    )
except ValueError as error:
    print(error)

# %%
# Clean up the temporary folder.
import shutil

shutil.rmtree(folder)
