"""The textcaps trainer's declarative side: name, metric, knobs, default config, checks and search space.

Torch-free, so that validating a config at the Snakefile parse and the light jobs that read a trainer's knobs
never import torch; trainer.py adds the model and the training on top.
"""
from __future__ import annotations

import contextlib
import copy

from tunewise.train.options import OPTIMIZERS, SCHEDULES
from tunewise.trainers.base import Capabilities, check_data_source
from tunewise.trainers.textcaps import data_config as tc_data
from tunewise.trainers.textcaps import diagnosis
from tunewise.trainers.textcaps.data_config import VOCAB_SIZE
from tunewise.trainers.textcaps.encoder_specs import MODALITIES, check_encoder_spec
from tunewise.trainers.textcaps.options import OBJECTIVES, SEP_METHODS, UPDATE_MODES

DEFAULT_DATA = {
    "source": "embedded",  # embedded (the generator) | path (TextCaps JSON or parquet under data.path)
    "path": None,
    "generator": copy.deepcopy(tc_data.DEFAULT_GENERATOR),
    # loader keys (tc_data.DEFAULT_LOADER)
    "format": "auto",
    "image_root": None,
    "ocr_dir": None,
    "num_classes": 10,
    "classes": None,
    "image_size": 64,
    "threads": 1,
    # groups: spurious = the generator's slices through one shared encoder; expand = one sample per image
    # per group, e.g. [{name: image, modality: visual}, {name: text, modality: text}, {name: both, modality: combined}].
    # auto: spurious on embedded data, expand on a user's TextCaps (it has no groups); groups null: the mode's
    # groups (tc_data.SPURIOUS_GROUPS / EXPAND_GROUPS). resolve_mode fills both in.
    "mode": "auto",
    "groups": None,
    "text_source": "ocr",  # ocr | caption | both
    "max_len": 48,
    "augment": 0.0,  # random translation of train images by up to this fraction of the image size
}

DEFAULT_CONFIG = {
    "data": DEFAULT_DATA,
    "model": {
        "latent_dim": 64,
        "head_hidden": 64,  # 0: linear head
        "dropout": 0.1,
        "visual": {"encoder": "small_cnn", "width": 16},  # resnet18 | resnet34 | small_cnn (+ weights: none|<path>)
        "text": {"encoder": "mlp_text"},  # mlp_text | char_cnn_text | transformer_text
        "fusion": "concat",  # combined encoders: concat | sum
        # one encoder of this modality for every group; null: one per group; auto: combined in spurious mode, null in
        # expand mode
        "shared_encoder": "auto",
    },
    "anchors": {
        "enabled": True,
        "anchor_eps": 1e-4,
        "lambda_fit": 1e-3,
        "lambda_sep": 1e-3,
        "sep_method": "classifier",  # classifier | w2_margin
        "sep_samples_per_class": 16,
        "margin": 1.0,  # w2_margin only
    },
    "groupdro": {
        "enabled": True,
        "eta": 0.01,
        "gamma": 0.9,
        "update_mode": "exp_smooth",  # plain | exp_smooth
        "adjustment": 0.0,  # C in C / sqrt(n_g)
        "warmup_epochs": 2,
        "objective": "weighted",  # weighted | max
    },
    "optim": {
        "name": "adam",
        "lr": 1e-3,
        "lr_backbone": None,  # pretrainable trunks (ResNet, or a trunk loaded from a path); null: lr
        "lr_new": None,  # everything else; null: lr
        "weight_decay": 1e-4,
        "momentum": 0.9,
        "param_groups": {},
    },
    "schedule": {"name": "none", "warmup_epochs": 0, "lr_end_factor": 0.01, "step_size": 10, "gamma": 0.1, "patience": 3},
    "train": {
        "epochs": 12,
        "batch_size": 64,
        # off by default: gradient norms run 3-8 here, so a bound of 1 clipped every step after warm-up and
        # hid the learning rate from the diagnosis (methods.md: clip at the 90th percentile when needed)
        "grad_clip": None,
        "patience": None,
        "min_delta": 0.0,
        "amp": "auto",
        "workers": 0,  # DataLoader workers gathering batches (0: in the training process)
        "eval_train_samples": 1000,  # train metrics on a fixed subset: the gap needs them, not all rows
        "eval_batch_size": 500,
    },
}


def resolve_mode(config: dict) -> dict:
    """data.mode, data.groups and model.shared_encoder where they are left to the default, filled in place from
    the data source: the generator's data has majority / minority slices (spurious mode, one shared encoder), a
    user's TextCaps has none (expand mode, one encoder per view). Idempotent. check_config calls it, so the
    resolved experiment (and every run's config.yaml) shows the values trained with."""
    data, model = config["data"], config["model"]
    if data.get("mode", "auto") == "auto":
        data["mode"] = "spurious" if data.get("source") == "embedded" else "expand"
    spurious = data["mode"] == "spurious"
    if data.get("groups") is None:
        data["groups"] = copy.deepcopy(list(tc_data.SPURIOUS_GROUPS if spurious else tc_data.EXPAND_GROUPS))
    if model.get("shared_encoder", "auto") == "auto":
        model["shared_encoder"] = tc_data.SPURIOUS_SHARED_ENCODER if spurious else None
    return config


def effective_config(config: dict) -> dict:
    """The config with resolve_mode applied, the caller's left as it is (a copy only when something is auto)."""
    data, model = config["data"], config["model"]
    if data.get("mode", "auto") != "auto" and data.get("groups") is not None and model.get("shared_encoder") != "auto":
        return config
    return resolve_mode(copy.deepcopy(config))


def _check_groups(data: dict, shared) -> None:
    """The groups against the mode: the combinations that cannot train are refused here, at validation."""
    groups = data["groups"]
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) and g.get("name") for g in groups):
        raise ValueError("data.groups: a non-empty list of {name, modality, ...} entries is required")
    names = [str(g["name"]) for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"data.groups: names must be unique, got {names}")
    generator = [g["name"] for g in tc_data.SPURIOUS_GROUPS]
    if data["mode"] == "spurious" and sorted(names) != sorted(generator):
        raise ValueError(
            f"data.groups: mode spurious puts each image in its generator group ({', '.join(generator)}), got "
            f"{', '.join(names)}; for views of each image use mode: expand (or leave data.mode and data.groups out)"
        )
    if shared is not None and shared not in MODALITIES:
        raise ValueError(f"model.shared_encoder: expected one of {', '.join(MODALITIES)}, auto or null, got {shared!r}")
    if data["mode"] == "expand" and shared is not None:
        raise ValueError("model.shared_encoder: expand mode gives each group its own view and encoder; set it to null "
                         "(or leave it out)")
    if shared is None:
        for g in groups:
            if g.get("modality") not in MODALITIES:
                raise ValueError(
                    f"data.groups[{g['name']}].modality: expected one of {', '.join(MODALITIES)} "
                    f"(each group has its own encoder when model.shared_encoder is null), got {g.get('modality')!r}"
                )


def _group_has_own_spec(group: dict) -> bool:
    return bool(set(group) - {"name", "modality"})


def encoder_spec(modality: str, model_cfg: dict, name: str) -> dict:
    """The build_encoder spec of a modality from model.visual / model.text / model.fusion."""
    if modality == "visual":
        return {"name": name, "modality": "visual", **model_cfg["visual"]}
    if modality == "text":
        return {"name": name, "modality": "text", **model_cfg["text"]}
    if modality == "combined":
        return {"name": name, "modality": "combined", "fusion": model_cfg.get("fusion", "concat"),
                "visual": dict(model_cfg["visual"]), "text": dict(model_cfg["text"])}
    raise ValueError(f"modality: expected one of {', '.join(MODALITIES)}, got {modality!r}")


def model_encoder_specs(config: dict) -> list[tuple[str, dict]]:
    """(modality, build_encoder spec) of each encoder the model has: the shared one, or one per group."""
    config = effective_config(config)
    m, groups = config["model"], config["data"]["groups"]
    if m.get("shared_encoder"):
        return [(m["shared_encoder"], encoder_spec(m["shared_encoder"], m, "model.shared_encoder"))]
    return [(g["modality"], g if _group_has_own_spec(g) else encoder_spec(g["modality"], m, g["name"])) for g in groups]


@contextlib.contextmanager
def encoder_spec_errors(config: dict):
    """An encoder spec's error names where the spec came from: the shared encoder, or the groups."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        where = "model.shared_encoder" if config["model"].get("shared_encoder") else "data.groups"
        raise type(e)(f"{where} / model.visual / model.text: {e}") from None


TEST_CONFUSION_FILE = "confusion_test.json"  # evaluate_test's confusion matrix, in the final folder


class TextCapsSpec(Capabilities):
    name = "textcaps"
    primary_metric = "val/worst_group_acc"
    direction = "max"
    knobs = {
        "lr": "optim.lr",
        "lr_backbone": "optim.lr_backbone",
        "weight_decay": "optim.weight_decay",
        "dropout": "model.dropout",
        "epochs": "train.epochs",
        "batch_size": "train.batch_size",
        "capacity": ["model.latent_dim", "model.head_hidden"],
        "scheduler": "schedule.name",
        "warmup": "schedule.warmup_epochs",
        "grad_clip": "train.grad_clip",
        "patience": "train.patience",
        "augmentation": "data.augment",
        "groupdro": "groupdro.enabled",
        "groupdro_eta": "groupdro.eta",
        "groupdro_warmup": "groupdro.warmup_epochs",
        "lambda_fit": "anchors.lambda_fit",
        "lambda_sep": "anchors.lambda_sep",
        "text_encoder": "model.text.encoder",
    }
    # encoder specs carry encoder-specific keys (width, weights, hidden, channels, ...): build_encoder checks them
    open_config_keys = {"optim.param_groups", "model.visual", "model.text", "data.classes"}
    report_sections = ("tunewise.trainers.textcaps.report:group_section",)
    # its own rules' thresholds (diagnosis.py), configurable as diagnose.thresholds.<key>, and two generic ones
    # for curves that behave differently here (measured on 8-epoch runs of the generator's data, bench `trust`):
    # - train_jitter_rel: train/worst_group_acc is a minimum over groups, and which group is worst flips between
    #   epochs; its step-to-step std over the second half was 11-21% of its range at the default lr and 7-19% at
    #   10x that lr, so it tells nothing of the step size (the update ratio does: 0.003 vs 0.022). Above 0.3 only,
    #   a jumpy validation curve is read as noise, not as a learning rate too high;
    # - loss_jitter_rel: train/loss is the q-weighted objective, which moves as q moves: 0.2-14% of its range at
    #   both learning rates (the generic 10% would call a GroupDRO run's loss oscillating).
    diagnosis_thresholds = {**diagnosis.THRESHOLDS, "train_jitter_rel": 0.3, "loss_jitter_rel": 0.25}

    def extra_findings(self, history, metrics: dict, thresholds: dict) -> list[dict]:
        """Group gap, GroupDRO's q, the anchors' fit, class overlap and confused pairs (diagnosis.py)."""
        return diagnosis.findings(history, metrics, thresholds)

    def recommendation_patterns(self) -> dict:
        return dict(diagnosis.PATTERNS)

    def default_config(self) -> dict:
        return copy.deepcopy(DEFAULT_CONFIG)

    def metric_names(self, config: dict) -> list[str]:
        """What a run writes (checked against metric.name at validation); group and class names come from the
        data, hence the patterns."""
        names = ["loss", "acc", "worst_group_acc", "avg_acc", "acc/*", "class_acc/*"]
        return [f"{split}/{name}" for split in ("val", "train") for name in names] + ["train/eval_loss"]

    # --- config ---------------------------------------------------------------------------------
    def check_config(self, config: dict) -> None:
        data, m, a, dro = config["data"], config["model"], config["anchors"], config["groupdro"]
        check_data_source(data)
        tc_data.resolve_generator_config(data.get("generator"))
        loader = tc_data.resolve_loader_config(data)
        if data["source"] == "path":
            # cheap (nothing is read): a folder, with the train split in a known layout; the other splits and the
            # contents are checked at prepare_data
            root = tc_data.check_folder(data["path"])
            tc_data.detect_layout(root, "train", loader["format"])
        if data["mode"] not in tc_data.MODE_CHOICES:
            raise ValueError(f"data.mode: expected one of {', '.join(tc_data.MODE_CHOICES)}, got {data['mode']!r}")
        resolve_mode(config)
        if data["text_source"] not in tc_data.TEXT_SOURCES:
            raise ValueError(f"data.text_source: expected one of {tc_data.TEXT_SOURCES}, got {data['text_source']!r}")
        if int(data["max_len"]) < 1:
            raise ValueError(f"data.max_len: must be >= 1, got {data['max_len']}")
        if not 0.0 <= float(data["augment"]) < 0.5:
            raise ValueError(f"data.augment: must be in [0, 0.5), got {data['augment']}")
        _check_groups(data, m.get("shared_encoder"))
        for key in ("latent_dim",):
            if int(m[key]) < 1:
                raise ValueError(f"model.{key}: must be >= 1, got {m[key]}")
        if int(m["head_hidden"]) < 0:
            raise ValueError(f"model.head_hidden: must be >= 0, got {m['head_hidden']}")
        if not 0.0 <= float(m["dropout"]) < 1.0:
            raise ValueError(f"model.dropout: must be in [0, 1), got {m['dropout']}")
        if a["sep_method"] not in SEP_METHODS:
            raise ValueError(f"anchors.sep_method: expected one of {', '.join(SEP_METHODS)}, got {a['sep_method']!r}")
        for key in ("anchor_eps", "lambda_fit", "lambda_sep", "margin"):
            if float(a[key]) < 0:
                raise ValueError(f"anchors.{key}: must be >= 0, got {a[key]}")
        if int(a["sep_samples_per_class"]) < 1:
            raise ValueError(f"anchors.sep_samples_per_class: must be >= 1, got {a['sep_samples_per_class']}")
        if dro["update_mode"] not in UPDATE_MODES:
            raise ValueError(f"groupdro.update_mode: expected one of {', '.join(UPDATE_MODES)}, got {dro['update_mode']!r}")
        if dro["objective"] not in OBJECTIVES:
            raise ValueError(f"groupdro.objective: expected one of {', '.join(OBJECTIVES)}, got {dro['objective']!r}")
        if float(dro["eta"]) < 0:
            raise ValueError(f"groupdro.eta: must be >= 0, got {dro['eta']}")
        if not 0.0 <= float(dro["gamma"]) < 1.0:
            raise ValueError(f"groupdro.gamma: must be in [0, 1), got {dro['gamma']}")
        if int(dro["warmup_epochs"]) < 0:
            raise ValueError(f"groupdro.warmup_epochs: must be >= 0, got {dro['warmup_epochs']}")
        if config["optim"]["name"] not in OPTIMIZERS:
            raise ValueError(f"optim.name: expected one of {', '.join(OPTIMIZERS)}, got {config['optim']['name']!r}")
        for key in ("lr", "lr_backbone", "lr_new"):
            value = config["optim"].get(key)
            if (value is not None or key == "lr") and float(value) <= 0:
                raise ValueError(f"optim.{key}: must be > 0, got {value}")
        if config["schedule"]["name"] not in SCHEDULES:
            raise ValueError(f"schedule.name: expected one of {', '.join(SCHEDULES)}, got {config['schedule']['name']!r}")
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if int(config["train"][key]) < 1:
                raise ValueError(f"train.{key}: must be >= 1, got {config['train'][key]}")
        if int(config["train"]["workers"]) < 0:
            raise ValueError(f"train.workers: must be >= 0, got {config['train']['workers']}")
        # the encoder specs, checked without building them (no torch); TextCapsTrainer.check_config builds them
        with encoder_spec_errors(config):
            for _, spec in model_encoder_specs(config):
                check_encoder_spec(spec, vocab_size=VOCAB_SIZE, max_len=int(data["max_len"]))

    def search_space(self) -> dict:
        return {
            "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "optim.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
            "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
            "groupdro.eta": {"type": "float", "low": 1e-3, "high": 1e-1, "log": True},
            "groupdro.warmup_epochs": {"type": "int", "low": 0, "high": 5},
            "anchors.lambda_fit": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "train.batch_size": {"type": "categorical", "choices": [32, 64, 128]},
        }
