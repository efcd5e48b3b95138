"""Rigs and campaigns: virtual boards wired to a one-link gateway, driven through a story.

The tests, the HIL suite and the benchmarks share them; nothing a technician
runs imports them. They are generic over the role registry: a role's spec
(protocol/roles/) says which status counter its sensor moves, its world model
(tools/sim/worlds/) says how to make the sensor busy and what really happened.

  board.py      Rig: one commissioned virtual board + OneLinkGateway + console reader
  power_cut.py  power_cut_campaign: cut the power at random instants, count what each cut lost
  gateway_rig.py  the gateway as `prapa campaign` runs it: a steppable wall clock and a tap (heap, replays)
  attacks.py    attack frames for a gateway's UDP link, and the verdict on what it did with them
  campaign_checks.py  the campaign's checks beyond the ledger's: attacks, heap, resets, commands, clock steps
"""
