"""mergekit YAML recipes <-> mergebench methods (docs/methods.md, "mergekit recipes").

`from_recipe` turns a mergekit 0.1.5 recipe (`merge_method`, `base_model`, `models` with
scalar `parameters`, top-level `parameters`, `dtype`) into one mergebench merge: a method, its
options, the pretrained checkpoint and `{task: checkpoint}`. `to_recipe` is the inverse for
the methods mergekit has. Every recipe this cannot run exactly is refused with one line
naming the recipe key; the conventions that remain (documented in docs/methods.md) are
mergekit's top-k count and tie breaking, its zero-sum sign, and DARE/DELLA's rescaling
(L1 norm in mergekit, `1 / keep probability` here) with our own draws.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from mergebench.methods.registry import method_defaults
from mergebench.util.errors import MergeBenchError
from mergebench.util.fs import atomic_write_text

RECIPE_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
DTYPES = ("float32", "bfloat16", "float16")
# mergekit's generalized task arithmetic: merge_method -> (sign consensus, default
# normalize, default rescale).
_GTA = {
    "task_arithmetic": (False, False, False),
    "ties": (True, True, False),
    "dare_ties": (True, False, True),
    "dare_linear": (False, False, True),
    "breadcrumbs": (False, False, False),
    "breadcrumbs_ties": (True, False, False),
    "della": (True, True, True),
    "della_linear": (False, False, True),
}
MERGE_METHODS = ("linear", *_GTA, "slerp", "model_stock")
# Per-model parameter -> its mergekit default (None: required).
_PER_MODEL = {"weight": None, "density": 1.0, "gamma": 0.01, "epsilon": 0.15}
_SHARED = ("normalize", "lambda", "rescale", "int8_mask", "t", "filter_wise")
_GTA_PARAMS = ("weight", "density", "normalize", "lambda", "rescale", "int8_mask")
# The parameters each merge_method takes (mergekit 0.1.5's specs).
PARAMETERS = {
    "linear": ("weight", "normalize"),
    **{name: _GTA_PARAMS for name in _GTA},
    "breadcrumbs": (*_GTA_PARAMS, "gamma"),
    "breadcrumbs_ties": (*_GTA_PARAMS, "gamma"),
    "della": (*_GTA_PARAMS, "epsilon"),
    "della_linear": (*_GTA_PARAMS, "epsilon"),
    "slerp": ("t",),
    "model_stock": ("filter_wise",),
}


@dataclass(frozen=True)
class RecipeMerge:
    """One mergebench merge equivalent to a recipe."""

    method: str
    params: dict[str, Any]
    pretrained: str
    finetuned: dict[str, str]
    out_dtype: str | None = None


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe file as a mapping (a YAML error or another shape: one line naming it)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise MergeBenchError(f"mergekit: cannot read {path} ({err.strerror})") from None
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MergeBenchError(f"mergekit: {path} is not YAML ({first})") from None
    if not isinstance(recipe, dict):
        raise MergeBenchError(f"mergekit: {path}: expected a mapping, got {type(recipe).__name__}")
    return recipe


def _scalar(where: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, list | dict):
        raise MergeBenchError(
            f"{where}: per-layer gradient lists and filtered values are not supported "
            "(scalar parameters only)"
        )
    if kind is bool and not isinstance(value, bool):
        raise MergeBenchError(f"{where}: {value!r} is not true/false")
    if kind is not bool and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise MergeBenchError(f"{where}: {value!r} is not a number")
    return value


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergeBenchError(f"{where}: expected a mapping, got {value!r}")
    return value


def _model_path(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise MergeBenchError(f"{where}: expected a model path or hub id, got {value!r}")
    if "+" in value:
        raise MergeBenchError(f"{where}: LoRA-on-model references ({value}) are not supported")
    return value


def _task_names(paths: Sequence[str]) -> list[str]:
    """A task name per model: its folder's name, made unique with _2, _3, ..."""
    names: list[str] = []
    for path in paths:
        stem = Path(path.rstrip("/")).name.replace(".", "_") or "model"
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}_{n}"
        names.append(name)
    return names


@dataclass(frozen=True)
class _Recipe:
    method: str
    base: str | None
    models: list[str]
    per_model: list[dict[str, Any]]
    shared: dict[str, Any]
    out_dtype: str | None

    def shared_value(self, key: str, default: Any, kind: type) -> Any:
        if key not in self.shared:
            return default
        return _scalar(f"parameters.{key}", self.shared[key], kind)

    def one_value(self, key: str, indices: Sequence[int]) -> float:
        """The per-model `key`, which must be the same for every model in `indices`."""
        values = []
        for i in indices:
            where = f"models[{i}].parameters.{key}"
            if key in self.per_model[i]:
                value = self.per_model[i][key]
            elif key in self.shared:
                value, where = self.shared[key], f"parameters.{key}"
            elif _PER_MODEL[key] is None:
                raise MergeBenchError(f"models[{i}].parameters.{key}: required by {self.method}")
            else:
                value = _PER_MODEL[key]
            values.append((where, float(_scalar(where, value, float))))
        first = values[0][1]
        for where, value in values[1:]:
            if value != first:
                raise MergeBenchError(
                    f"{where}: {value} differs from {values[0][0]} ({first}); mergebench's "
                    f"{self.method} takes one {key} for every model"
                )
        return first


def _parse(recipe: Mapping[str, Any]) -> _Recipe:
    for key in recipe:
        if key not in RECIPE_KEYS:
            raise MergeBenchError(
                f"{key}: recipe key not supported (mergebench runs {', '.join(RECIPE_KEYS)})"
            )
    method = recipe.get("merge_method")
    if method not in MERGE_METHODS:
        raise MergeBenchError(
            f"merge_method: {method!r} is not supported (choose from {', '.join(MERGE_METHODS)})"
        )
    base = recipe.get("base_model")
    if base is not None:
        base = _model_path("base_model", base)
    entries = recipe.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeBenchError("models: expected a list of {model: PATH, parameters: {...}}")
    models, per_model = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeBenchError(f"models[{i}]: expected {{model: PATH, parameters: {{...}}}}")
        for key in entry:
            if key not in ("model", "parameters"):
                raise MergeBenchError(f"models[{i}].{key}: not supported")
        models.append(_model_path(f"models[{i}].model", entry["model"]))
        params = _mapping(f"models[{i}].parameters", entry.get("parameters"))
        for key in params:
            if key not in _PER_MODEL:
                raise MergeBenchError(
                    f"models[{i}].parameters.{key}: not a per-model parameter mergebench runs "
                    f"({', '.join(_PER_MODEL)})"
                )
        per_model.append(params)
    shared = _mapping("parameters", recipe.get("parameters"))
    for key in shared:
        if key not in _SHARED and key not in _PER_MODEL:
            raise MergeBenchError(f"parameters.{key}: not a parameter mergebench runs")
    taken = PARAMETERS[str(method)]
    for where, params in [("parameters", shared)] + [
        (f"models[{i}].parameters", p) for i, p in enumerate(per_model)
    ]:
        for key in params:
            if key not in taken:
                raise MergeBenchError(f"{where}.{key}: not a parameter of merge_method {method}")
    dtype = recipe.get("out_dtype", recipe.get("dtype"))
    if dtype is not None and dtype not in DTYPES:
        raise MergeBenchError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    return _Recipe(str(method), base, models, per_model, shared, dtype)


def _divided(scale: float, divisor: float) -> float:
    """mergekit's `normalize`: divide by the weights' sum, left alone when it is ~0."""
    return scale / divisor if abs(divisor) >= 1e-8 else scale


def from_recipe(recipe: Mapping[str, Any]) -> RecipeMerge:
    """The mergebench merge equivalent to `recipe` (refused with one line otherwise)."""
    r = _parse(recipe)
    if r.method == "linear":
        return _linear(r)
    if r.base is None:
        raise MergeBenchError(f"base_model: required by merge_method {r.method}")
    experts = [i for i, path in enumerate(r.models) if path != r.base]
    if r.method == "slerp":
        return _slerp(r, experts)
    if not experts:
        raise MergeBenchError("models: no model besides base_model")
    names = _task_names([r.models[i] for i in experts])
    finetuned = {name: r.models[i] for name, i in zip(names, experts, strict=True)}
    if r.method == "model_stock":
        if len(experts) < 2:
            raise MergeBenchError(
                "models: model_stock needs at least two models besides base_model"
            )
        params = {"filter_wise": r.shared_value("filter_wise", False, bool)}
        return RecipeMerge("model_stock", params, r.base, finetuned, r.out_dtype)
    method, params = _task_vector_method(r, experts)
    return RecipeMerge(method, params, r.base, finetuned, r.out_dtype)


def _linear(r: _Recipe) -> RecipeMerge:
    # mergekit's linear merges `base_model` as one more input, weighted like the others.
    if r.base is not None and r.base not in r.models:
        if "weight" not in r.shared:
            raise MergeBenchError(
                "base_model: linear merges it as one more model and needs its weight "
                "(parameters.weight)"
            )
        r = replace(r, models=[*r.models, r.base], per_model=[*r.per_model, {}])
    weight = r.one_value("weight", range(len(r.models)))
    normalize = r.shared_value("normalize", True, bool)
    n = len(r.models)
    total = _divided(n * weight, n * weight) if normalize else n * weight
    if abs(total - 1.0) > 1e-12:
        raise MergeBenchError(
            f"models[0].parameters.weight: {weight} with normalize={normalize} sums to "
            f"{total}, not 1; mergebench's weight_averaging is the mean of the models"
        )
    pretrained = r.base if r.base is not None else r.models[0]
    finetuned = dict(zip(_task_names(r.models), r.models, strict=True))
    return RecipeMerge("weight_averaging", {}, pretrained, finetuned, r.out_dtype)


def _slerp(r: _Recipe, experts: list[int]) -> RecipeMerge:
    if len(r.models) != 2 or len(experts) != 1:
        raise MergeBenchError("models: slerp takes exactly two models, one of them base_model")
    assert r.base is not None
    other = r.models[experts[0]]
    a, b = _task_names([r.base, other])
    if "t" not in r.shared:
        raise MergeBenchError("parameters.t: required by slerp")
    params = {"t": float(r.shared_value("t", None, float)), "endpoints": [a, b]}
    return RecipeMerge("slerp", params, r.base, {a: r.base, b: other}, r.out_dtype)


def _task_vector_method(r: _Recipe, experts: list[int]) -> tuple[str, dict[str, Any]]:
    consensus, normalize_default, rescale_default = _GTA[r.method]
    normalize = r.shared_value("normalize", normalize_default, bool)
    rescale = r.shared_value("rescale", rescale_default, bool)
    lam = float(r.shared_value("lambda", 1.0, float))
    r.shared_value("int8_mask", False, bool)  # the mask's storage type: no effect on values
    weight = r.one_value("weight", experts)
    # task_arithmetic sparsifies nothing: mergekit ignores its density.
    density = 1.0 if r.method == "task_arithmetic" else r.one_value("density", experts)
    n = len(experts)
    if consensus:
        # normalize divides by the weights of the agreeing models: with one weight, the
        # disjoint mean (mergekit leaves a zero divisor at 1: all-zero weights merge to 0).
        aggregate = "mean" if normalize else "sum"
        scaling = (lam if weight != 0 else 0.0) if normalize else lam * weight
    else:
        aggregate = "sum"
        scaling = lam * _divided(weight, n * weight) if normalize else lam * weight
    if r.method in ("ties", "breadcrumbs", "breadcrumbs_ties") and rescale:
        raise MergeBenchError(
            f"parameters.rescale: true has no place in mergebench's {r.method.split('_')[0]} "
            "(mergekit rescales the kept entries to the tensor's L1 norm)"
        )
    if r.method == "task_arithmetic":
        return "task_arithmetic", {"scaling": scaling}
    if r.method == "ties":
        return "ties", _ties(density, aggregate, scaling)
    if r.method in ("dare_ties", "dare_linear"):
        if consensus:
            base, base_params = "ties", _ties(1.0, aggregate, scaling)
        else:
            base, base_params = "task_arithmetic", {"scaling": scaling}
        params = {"base": base, "base_params": base_params, "drop": 1.0 - min(density, 1.0)}
        return "dare", {**params, "rescale": rescale}
    if r.method == "breadcrumbs":
        gamma = r.one_value("gamma", experts)
        return "breadcrumbs", {
            "density": min(density, 1.0),
            "outlier": gamma,
            "scaling": scaling,
            "scope": "tensor",
        }
    if r.method == "della":
        if not normalize:
            raise MergeBenchError(
                "parameters.normalize: false has no place in mergebench's della (it takes "
                "the disjoint mean of the agreeing models)"
            )
        epsilon = r.one_value("epsilon", experts)
        return "della", {
            "density": density,
            "window": 2 * epsilon,
            "scaling": scaling,
            "rescale": rescale,
        }
    raise MergeBenchError(
        f"merge_method: {r.method} has no mergebench method ("
        + (
            "breadcrumbs takes no sign election"
            if r.method == "breadcrumbs_ties"
            else "della always elects signs and takes the disjoint mean"
        )
        + ", docs/methods.md)"
    )


def _ties(k: float, aggregate: str, scaling: float) -> dict[str, Any]:
    return {"k": min(k, 1.0), "topk_scope": "tensor", "aggregate": aggregate, "scaling": scaling}


def load_recipe(path: str | Path) -> RecipeMerge:
    """`from_recipe` on a file; errors name the file."""
    try:
        return from_recipe(read_recipe(path))
    except MergeBenchError as err:
        message = str(err)
        prefix = "" if message.startswith("mergekit:") else f"mergekit: {path}: "
        raise MergeBenchError(prefix + message) from None


# -- mergebench -> recipe -------------------------------------------------------------------


def _options(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    return {**method_defaults(method), **params}


def _refuse(method: str, why: str) -> MergeBenchError:
    return MergeBenchError(f"mergekit_out: method {method} {why}")


def _models(finetuned: Mapping[str, str], weight: float | None = None, **extra: Any) -> list:
    models = []
    for path in finetuned.values():
        params = {**({"weight": weight} if weight is not None else {}), **extra}
        models.append({"model": str(path), **({"parameters": params} if params else {})})
    return models


def to_recipe(
    method: str,
    params: Mapping[str, Any],
    pretrained: str,
    finetuned: Mapping[str, str],
    out_dtype: str | None = None,
) -> dict[str, Any]:
    """The mergekit recipe of a mergebench merge (refused with one line where mergekit has
    no equivalent)."""
    o = _options(method, params)
    recipe: dict[str, Any]
    if method == "weight_averaging":
        recipe = {"merge_method": "linear", "models": _models(finetuned, 1.0)}
        recipe["parameters"] = {"normalize": True}
    elif method == "task_arithmetic":
        recipe = _gta("task_arithmetic", pretrained, _models(finetuned, o["scaling"]))
        recipe["parameters"] = {"normalize": False}
    elif method == "ties":
        if o["topk_scope"] != "tensor":
            raise _refuse(method, "with topk_scope=global: mergekit trims per tensor")
        recipe = _ties_recipe("ties", pretrained, finetuned, o, density=o["k"])
    elif method == "dare":
        recipe = _dare_recipe(pretrained, finetuned, o)
    elif method == "breadcrumbs":
        if o["scope"] != "tensor":
            raise _refuse(method, "with scope=row: mergekit ranks whole tensors (scope=tensor)")
        models = _models(finetuned, o["scaling"], density=o["density"], gamma=o["outlier"])
        recipe = _gta("breadcrumbs", pretrained, models)
        recipe["parameters"] = {"normalize": False, "rescale": False}
    elif method == "della":
        models = _models(finetuned, 1.0, density=o["density"], epsilon=o["window"] / 2)
        recipe = _gta("della", pretrained, models)
        recipe["parameters"] = {"normalize": True, "rescale": o["rescale"], "lambda": o["scaling"]}
    elif method == "slerp":
        names = list(o["endpoints"] or finetuned)
        if len(names) != 2 or any(name not in finetuned for name in names):
            raise _refuse(method, "needs exactly two tasks")
        a, b = (str(finetuned[name]) for name in names)
        recipe = {"merge_method": "slerp", "base_model": a}
        recipe["models"] = [{"model": a}, {"model": b}]
        recipe["parameters"] = {"t": o["t"]}
    elif method == "model_stock":
        recipe = _gta("model_stock", pretrained, _models(finetuned))
        recipe["parameters"] = {"filter_wise": o["filter_wise"]}
    else:
        raise _refuse(method, "has no mergekit merge_method")
    if out_dtype is not None:
        recipe["dtype"] = out_dtype
    return recipe


def _gta(name: str, pretrained: str, models: list) -> dict[str, Any]:
    return {"merge_method": name, "base_model": str(pretrained), "models": models}


def _ties_recipe(
    name: str, pretrained: str, finetuned: Mapping[str, str], o: Mapping[str, Any], density: float
) -> dict[str, Any]:
    mean = o["aggregate"] == "mean"
    recipe = _gta(name, pretrained, _models(finetuned, 1.0, density=density))
    recipe["parameters"] = {"normalize": mean, "lambda": o["scaling"]}
    return recipe


def _dare_recipe(
    pretrained: str, finetuned: Mapping[str, str], o: Mapping[str, Any]
) -> dict[str, Any]:
    base = _options(o["base"], o.get("base_params") or {})
    density = 1.0 - o["drop"]
    if o["base"] == "task_arithmetic":
        recipe = _gta(
            "dare_linear", pretrained, _models(finetuned, base["scaling"], density=density)
        )
        recipe["parameters"] = {"normalize": False}
    elif o["base"] == "ties" and base["k"] == 1.0 and base["topk_scope"] == "tensor":
        recipe = _ties_recipe("dare_ties", pretrained, finetuned, base, density=density)
    else:
        raise _refuse(
            "dare",
            f"with base {o['base']}: mergekit has dare_linear (task_arithmetic) and dare_ties "
            "(ties with k=1.0, topk_scope=tensor)",
        )
    recipe["parameters"]["rescale"] = o["rescale"]
    return recipe


def write_recipe(recipe: Mapping[str, Any], path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(dict(recipe), sort_keys=False))
