"""The paper's generator experiments on the demo GAN (make-demo trains it): dissect layer3 on 1,000
samples labelled by the demo segmenter, remove the top units of a few concepts (Figure 4a), and map where
tree units add trees (Figure 4d). Prints what it measures. Run: .venv/bin/python bench/demo_generator_roles.py
"""
import json, time
import numpy as np
from pathlib import Path
from dissect_core.generators import load_generator, GeneratedDataset, removal_curve, insertion_map, unit_quantiles
from dissect_core.models import load_model
from dissect_core.segmenter import Segmenter
from dissect_core.dissect import dissect
d = Path("var/data/demo")
gm = json.loads((d/"generator.json").read_text()); sm = json.loads((d/"segmenter.json").read_text())
gen = load_generator(gm["arch"], d/"generator.safetensors", latent_dim=gm["latent_dim"])
seg_loaded = load_model(sm["arch"], d/"segmenter.safetensors", sm["num_classes"], input_size=sm["input_size"][0], mean=sm["mean"], std=sm["std"])
seg = Segmenter(seg_loaded.module, sm["labels"], categories=sm["categories"], mean=sm["mean"], std=sm["std"], input_size=tuple(sm["input_size"]))
t=time.time()
ds = GeneratedDataset(gen, seg, 1000, seed=0, batch_size=64)
res = dissect(gen, ds, ["layer3"], top_k_images=0)["layer3"]
print("dissect 1000 samples: %.1fs" % (time.time()-t))
names = [c.name for c in seg.concepts]
iou = np.asarray(res.iou)
labels = iou.argmax(1); best = iou.max(1)
from collections import Counter
print("detectors:", Counter(names[l] for l, b in zip(labels, best) if b >= 0.04).most_common())
for concept in ["tree", "house", "sky", "grass"]:
    c = names.index(concept); num = c + 1
    ranked = [int(u) for u in np.argsort(-iou[:, c], kind="stable")]
    t=time.time()
    r = removal_curve(gen, seg, "layer3", ranked, num, ks=[1,2,4,8,12,16,20], count=200, seed=1)
    print(concept, "top IoU %.3f" % iou[ranked[0], c], "baseline %.2f%%" % (100*r.baseline),
          " ".join("k%d:%+.1f%%" % (k, 100*ch) for k, ch in zip(r.ks, r.relative_change) if ch is not None), "(%.1fs)" % (time.time()-t))
    if concept == "tree":
        units = ranked[:20]
        vals = unit_quantiles(gen, "layer3", q=0.995, seed=7919, units=units)
        t=time.time()
        ins = insertion_map(gen, seg, "layer3", units, num, values=vals, count=16, seed=1, stride=2)
        m = ins.map
        print("insert tree: mean %.2f%% max %.2f%% min %.2f%% at best %s (%.1fs)" % (100*ins.mean_fraction, 100*np.nanmax(m), 100*np.nanmin(m), ins.best_position, time.time()-t))
        rows = np.flatnonzero(ins.tested.any(1)); cols = np.flatnonzero(ins.tested.any(0))
        for y in rows: print(" ".join("%4.1f" % (100*m[y, x]) for x in cols))
