"""The reports' configurations, like nanoGPT's config/: `python main.py --recipe NAME` takes a recipe's values as the
defaults of its flags (flags given on the command line override them) and prints what the recipe cannot reproduce.
"""

BOTH_REPORTS = dict(head="linear", ema=0.0, train_eval_frames=0, augment="none")  # plain 1x1-conv output, plain loss
RECIPES = {  # the two reports' configurations, as the reports give them
    "convnext_report": dict(model="convnext_unet", encoder="convnext_base", loss="mse+0.15*ssim+0.05*edge",
                            optimizer="adamw", encoder_lr=1e-4, lr=1e-3, weight_decay=1e-2, scheduler="onecycle",
                            batch_size=64, max_epochs=80, **BOTH_REPORTS),
    "resnet34_report": dict(model="resnet34", loss="rmse+ssim", optimizer="adam", lr=1e-3, encoder_lr=None,
                            weight_decay=1e-5, scheduler="cyclic", batch_size=32, max_epochs=100, visualize_every=100,
                            **BOTH_REPORTS),
}
RECIPE_GAPS = {  # what a recipe cannot reproduce as the report did it; printed with the recipe
    "convnext_report": ["the report never names the ConvNeXt size: convnext_base is our choice (--encoder to change)",
                        "AdamW's weight decay and OneCycle's settings are not in the report: torch's defaults "
                        "(0.01; pct_start 0.3, cosine)"],
    "resnet34_report": ["the report trains and scores at 224x224; here the 224x224 prediction is resized back and "
                        "scored at the frames' 144x256 (the report's way: evaluate.py --protocol resnet34_224)",
                        "the report freezes 'the first layers' without naming them: the stem (conv1, bn1) here "
                        "(--freeze stage1 .. stage4 freezes more)"],
    "both": ["ImageNet encoder weights come from timm's download (or --encoder-weights PATH); offline, "
             "--no-pretrained trains from scratch, which the reports did not",
             "the reports trained on a GPU (the ConvNeXt one names an NVIDIA L4); on a CPU their epochs take days",
             "evaluation clamps every prediction to [0, 20] m, the ground truth's range, as for every model"],
}


def set_recipe_defaults(parser, name):
    """The recipe's values become the defaults of the parser's flags."""
    parser.set_defaults(**RECIPES[name])


def recipe_note(name, args):
    """What a run takes from the recipe, which flags overrode it, and what the recipe cannot reproduce."""
    recipe = RECIPES[name]
    explicit = sorted(k for k in recipe if getattr(args, k) != recipe[k])
    kept = ", ".join(f"{k}={v}" for k, v in recipe.items() if k not in explicit)
    return (f"recipe {name}: {kept}" + (f" (overridden by flags: {', '.join(explicit)})" if explicit else "")
            + "\nnot as in the report:\n" + "\n".join(f"  - {gap}" for gap in RECIPE_GAPS[name] + RECIPE_GAPS["both"]))
