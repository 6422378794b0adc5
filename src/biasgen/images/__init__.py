"""The image wing: data and splits, the U-Net, the image metrics and figures, and the audit definition.

    from biasgen.images.audit import audit
    summary = audit("runs/digits")            # the twin-split audit of the bundled digits
"""
