"""RaVL (Varma et al., NeurIPS 2024): region-level discovery of learned spurious correlations and
region-aware fine-tuning.  Hooks live in :mod:`.plugin`; the rest is imported on first use, so
importing this package imports no torch.  Protocol, deviations and measurements: docs/methods/ravl.md.
"""

from __future__ import annotations

from ...lazy import lazy_getattr

#: public name -> submodule defining it (resolved lazily)
_NAMES: dict[str, str] = {
    **dict.fromkeys(("NAME", "BASELINE", "CITATION", "TEMPERATURE", "DiscoveryConfig", "FineTuneConfig",
                     "RegionConfig", "DiscoverConfig"), "configs"),
    **dict.fromkeys(("GridProposer", "BoxesProposer", "grid_boxes", "proposed_boxes", "region_kind",
                     "proposer_for"), "proposers"),
    **dict.fromkeys(("Clustering", "cluster_regions", "cluster_regions_sampled", "cluster_bounded",
                     "cosine_distances", "k_candidates", "nearest_medoids"), "clustering"),
    **dict.fromkeys(("ClassGap", "ClusterScore", "Discovery", "class_gaps", "discover_from_embeddings",
                     "influence_score", "precision_at_k", "top_regions_for_prediction", "validity_check"),
                    "discovery"),
    **dict.fromkeys(("DiscoveryRun", "RegionInfo", "discover", "read_region_info"), "split_discovery"),
    **dict.fromkeys(("REPORT_FORMAT", "build_report", "format_summary"), "discovery_report"),
    **dict.fromkeys(("discover_context", "run_discover"), "command"),
    **dict.fromkeys(("clip_loss", "label_to_region_loss", "parse_caption_labels", "region_to_label_loss",
                     "relevant_regions"), "losses"),
    **dict.fromkeys(("TrainViews", "encode_with_token_regions", "region_feature_mode",
                     "token_regions_supported"), "views"),
    **dict.fromkeys(("RegionAwareFineTune", "oracle_train_regions"), "finetune"),
    **dict.fromkeys(("apply_visual_state", "load_finetuned_model", "load_init_model"), "loader"),
    "StateError": "loader",
}


__getattr__ = lazy_getattr(__name__, _NAMES, globals())


def __dir__() -> list[str]:
    return sorted(_NAMES)
