"""
Choosing the tolerance with GridSearchCV
========================================

:class:`skid.NetworkCompressor` is a scikit-learn estimator, so a grid search can choose its
settings. The calibration inputs are split by the cross-validation like any ``X``: each
candidate is fitted on one part and scored on the other, with scorers from :mod:`skid.metrics`
— top-1 ``agreement`` with the original model, and ``flops_kept``. The ``refit`` rule
:func:`skid.model_selection.most_compressed` then picks the smallest model whose mean
agreement meets a bound. ``memory=`` makes the forward passes a one-time cost for the whole
grid.
"""

# %%
# A trained model: an MLP on the digits.
import tempfile

import matplotlib.pyplot as plt
import pandas as pd
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from torch import nn

from skid import NetworkCompressor, metrics
from skid.model_selection import most_compressed

X, y = load_digits(return_X_y=True)
X, y = torch.tensor(X / 16, dtype=torch.float32), torch.tensor(y)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                      nn.Linear(256, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for _step in range(200):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    optimizer.step()
model.eval()

# %%
# The search: which tolerance gives the smallest model that agrees with the original on at
# least 99 % of held-out samples?
search = GridSearchCV(
    NetworkCompressor(model=model, memory=tempfile.mkdtemp()),
    {"tol": [0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03, 0.02, 0.01]},
    scoring={"agreement": metrics.agreement, "flops": metrics.flops_kept},
    refit=most_compressed(min_agreement=0.99),
    cv=3,
)
search.fit(X)
print("chosen:", search.best_params_)
print(pd.DataFrame(search.best_estimator_.layers_))

table = pd.DataFrame(search.cv_results_)[
    ["param_tol", "mean_test_agreement", "mean_test_flops"]
]
print(table.round(3).to_string(index=False))

# %%
fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
ax.plot(table.mean_test_flops, table.mean_test_agreement, "o-", label="candidates")
best = table.iloc[search.best_index_]
ax.plot(best.mean_test_flops, best.mean_test_agreement, "r*", markersize=14,
        label=f"most_compressed(0.99): tol={best.param_tol}")
ax.axhline(0.99, color="gray", lw=0.8)
for _, row in table.iterrows():
    ax.annotate(f"{row.param_tol}", (row.mean_test_flops, row.mean_test_agreement),
                textcoords="offset points", xytext=(4, -10), fontsize=7)
ax.set(xlabel="fraction of FLOPs kept (mean over folds)",
       ylabel="top-1 agreement (mean over folds)")
ax.legend()
plt.show()
