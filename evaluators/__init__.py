"""Evaluators faithful to the official code: FID, CMMD, FWD, GenEval, DPG-Bench (no arrag imports)."""
