"""Pair-making: the teacher's ODE and a rectified flow's Euler steps from seeded noise, triplet ids and
schema (`triplets`), shard planning and the exactly-once shard worker (`shards`), solvers (`solvers`)."""
