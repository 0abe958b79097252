"""RaVL's settings: one dataclass per concern, each field also a ``--ravl_*`` flag (torch-free)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ...argtypes import DataConfig, at_least, fraction, nested, option, positive_float

NAME = "ravl"
BASELINE = "clip_ft"
#: the oracle reference: clip_ft with GroupDRO over the train group labels (its Needs declare groups)
GROUP_DRO = "clip_ft_group_dro"
PREFIX = "ravl_"
CITATION = (
    "Varma, Delbrouck, Chen, Chaudhari & Langlotz, RaVL: Discovering and Mitigating Spurious Correlations "
    "in Fine-Tuned Vision-Language Models, NeurIPS 2024"
)
#: the temperature of RaVL's zero-shot softmax and of every loss term
TEMPERATURE = 0.07
KMEDOIDS_INITS = ("random", "build")
REGION_FEATURES = ("auto", "tokens", "masked", "crops")
POSITIVE_REGIONS = ("all", "relevant")
NEGATIVES = ("spurious", "spurious+other_classes")
SPURIOUS_REGIONS = ("discovered", "oracle")
SAMPLINGS = ("uniform", "upsample")
ERROR_SOURCES = ("evaluated", "start")


@dataclass(frozen=True)
class GridOptions:
    """The ``grid`` region proposer's setting."""

    grid: int = option(3, "N of the 'grid' proposer (N x N boxes)", type=at_least(1))


@dataclass(frozen=True)
class BoxesOptions:
    """The ``boxes`` region proposer's settings."""

    boxes_key: str = option("regions", "sample-json key holding the 'boxes' proposer's boxes")
    max_boxes: int = option(4, "boxes per image for the 'boxes' proposer (padded by repeating the last)",
                            type=at_least(1))


@dataclass(frozen=True)
class RegionConfig:
    """Which regions discovery and the loss use (``--ravl_regions``; each proposer has its own settings)."""

    regions: str = option("quadrants", "region proposer (quadrants, grid, boxes, or a plugin's)", metavar="NAME")
    truth_key: str = option("spurious_box", "sample-json key of the labelled spurious box(es): precision@10, the "
                                            "validity check and --ravl_spurious_regions oracle only")


@dataclass(frozen=True)
class DiscoveryConfig:
    """Settings of discovery (defaults: the paper and the authors' code; the cap is ours)."""

    influence_threshold: float = option(0.25, "keep clusters with influence H >= this", type=fraction)
    temperature: float = TEMPERATURE
    kmedoids_init: str = option("random", "FasterPAM initialisation: random (seeded by --seed) or the deterministic "
                                          "PAM build", choices=KMEDOIDS_INITS)
    kmedoids_max_iter: int = option(100, "FasterPAM iteration cap", type=at_least(1))
    #: regions listed in the report and shown in the sheet
    top_regions: int = option(10, "regions of the top cluster listed and shown", type=at_least(1))
    max_cluster_regions: int = option(10_000, "above this many regions, cluster a seeded sample of this size "
                                              "(CLARA-style) and assign every region to its nearest medoid",
                                      type=at_least(2))
    cluster_draws: int = option(1, "sampled clustering: samples drawn per K, the one of lowest total distance "
                                   "over all regions kept", type=at_least(1))


@dataclass(frozen=True)
class FineTuneConfig:
    """Training settings shared by ``ravl`` and ``clip_ft`` (the region options are ravl's)."""

    epochs: int = option(1, "fine-tuning epochs over train (ravl and clip_ft)", type=at_least(1))
    lr: float = option(1e-5, "AdamW learning rate (ravl and clip_ft)", type=positive_float)
    weight_decay: float = option(0.1, "AdamW weight decay (ravl and clip_ft)", type=float)
    batch_size: int = option(64, "images per step (ravl and clip_ft)", type=at_least(2))
    temperature: float = TEMPERATURE
    region_weight: float = option(0.2, "w in (1 - w) L_CLIP + w (L_R + L_A); 0.2 is the paper's", type=fraction)
    shuffle_buffer: int = option(256, "streaming shuffle window over train, in images (ravl and clip_ft)",
                                 type=at_least(1))
    discovery_split: str = option("val", "split the mitigation runs discovery on (class labels only)")
    region_features: str = option(
        "masked", "region embeddings in the loss: tokens (patch tokens of the image's own forward, pooled per region; "
                "open_clip ViTs), masked (the image with everything outside the region blanked, same scale), crops "
                "(each region cropped and up-scaled to the input size), auto (tokens where possible, else masked)",
        choices=REGION_FEATURES)
    init: str | None = option(None, "checkpoint (open_clip tag or file, same architecture) the fine-tuning of ravl "
                                    "and clip_ft starts from; discovery still uses the evaluated model. Unset: start "
                                    "from the evaluated model (not the paper's protocol)", metavar="CHECKPOINT")
    positive_regions: str = option("relevant", "positives of L_R and L_A: every non-spurious region (all) or only "
                                               "the one scoring highest for the image's label (relevant)",
                                   choices=POSITIVE_REGIONS)
    negatives: str = option("spurious+other_classes", "negatives of L_A: the batch's spurious regions, or also the positive "
                                        "regions of the batch's other classes", choices=NEGATIVES)
    spurious_regions: str = option("discovered", "which train regions are spurious: the top discovered cluster's, "
                                                 "or (diagnostic only) the labelled ones of --ravl_truth_key",
                                   choices=SPURIOUS_REGIONS)


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


@dataclass(frozen=True)
class ClipFtConfig(FineTuneConfig):
    """``clip_ft``'s settings: the shared fine-tuning flags plus the train sampling (JTT-style upsampling)."""

    sampling: str = option("uniform", "clip_ft: train sampling; upsample = weighted sampling with replacement that "
                                      "upweights the train images a model's zero-shot head misclassifies "
                                      "(JTT-style; class labels only)", choices=SAMPLINGS)
    upsample_factor: float = option(0.0, "clip_ft --ravl_sampling upsample: weight of a misclassified train image "
                                         "relative to a correct one; 0 = n_correct / n_misclassified (both sets "
                                         "weigh the same in total)", type=non_negative)
    upsample_errors_of: str = option("evaluated", "clip_ft --ravl_sampling upsample: whose zero-shot errors on train "
                                                  "are upsampled: the evaluated model (JTT's identification model: "
                                                  "the one that learned the train set's shortcut) or the fine-tuning's "
                                                  "start (--ravl_init; the same model without it)",
                                     choices=ERROR_SOURCES)


@dataclass(frozen=True)
class GroupDroFtConfig(ClipFtConfig):
    """``clip_ft_group_dro``'s settings: clip_ft's plus GroupDRO's step size."""

    dro_eta: float = option(1e-2, "clip_ft_group_dro: GroupDRO step size of the exponentiated group weights "
                                  "(SubpopBench's default)", type=positive_float)


@dataclass(frozen=True)
class RavlConfig:
    """The ``ravl`` mitigation's settings: fine-tuning (shared with ``clip_ft``), discovery and regions,
    all ``--ravl_*`` flags."""

    finetune: FineTuneConfig = nested(FineTuneConfig)
    discovery: DiscoveryConfig = nested(DiscoveryConfig)
    regions: RegionConfig = nested(RegionConfig)


@dataclass(frozen=True)
class DiscoverConfig:
    """The ``discover`` command's flags: clip_benchmark's names for the dataset and model, the data
    flags ``eval`` has, and RaVL's ``--ravl_*`` region and discovery settings."""

    dataset: str | None = option(None, "a group dataset: robust/<name> or wds/<name> with groups.json", type=str,
                                 required=True)
    dataset_root: str = option("root", "dataset root, clip_benchmark's templating ({dataset})")
    model: str | None = option(None, "open_clip model name (e.g. ViT-B-32, crp-tiny)", type=str, required=True)
    pretrained: str | None = option(None, "checkpoint tag or file", type=str, required=True)
    model_type: str = option("open_clip", "registered model type")
    model_cache_dir: str | None = option(None, "where open_clip caches downloaded weights", type=str)
    split: str = option("val", "class-labelled split to analyse")
    batch_size: int = option(64, "images per forward batch", type=at_least(1))
    num_workers: int = option(4, "DataLoader workers that decode images", type=at_least(0))
    seed: int = option(0, "k-medoids seed")
    no_amp: bool = option(False, "no mixed precision (on by default, as in clip_benchmark)", switch=True)
    output: str = option("ravl_discovery.json", "report JSON path; the PNG sheet goes beside it with the extension .png")
    quiet: bool = option(False, "no progress bars", switch=True)
    compare: bool = option(False, "also run the discovery baselines (random, George, Domino, Distilling Failures) on "
                                  "the same regions: precision@10 of each in the JSON, a table and <output>_compare.png",
                           switch=True)
    data: DataConfig = nested(DataConfig, prefix="")
    regions: RegionConfig = nested(RegionConfig, prefix=PREFIX)
    discovery: DiscoveryConfig = nested(DiscoveryConfig, prefix=PREFIX)
