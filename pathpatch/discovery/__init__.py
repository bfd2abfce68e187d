"""Circuit discovery: edge rankings (exact, EAP, EAP-IG), circuits of the top edges, ACDC's greedy search."""
