"""The names the textcaps trainer's anchor and GroupDRO settings take, torch-free (config validation)."""

SEP_METHODS = ("classifier", "w2_margin")  # anchors.sep_method
UPDATE_MODES = ("plain", "exp_smooth")  # groupdro.update_mode
OBJECTIVES = ("weighted", "max")  # groupdro.objective
