"""Hybrid MoE: which experts live where (placement), the CPU expert engine, NUMA topology."""
