"""The paper's numbers that the demo report puts beside ours (arXiv 2505.11711).

All sparsities are in % of parameters unchanged, measured on bf16 checkpoints at atol 1e-5 unless noted.
"""

TABLE1 = [  # (model, algorithm, sparsity %)
    ("Tulu-3-8B SFT→DPO", "DPO", 81.4),
    ("Tulu-3-70B SFT→DPO", "DPO", 95.2),
    ("deepseek-math-7b instruct→rl", "GRPO", 68.5),
    ("DeepSeek-V3-Base→R1-Zero", "GRPO", 86.0),
    ("mistral-7B→orpo-beta", "ORPO", 76.9),
    ("Eurus-7b-sft→kto", "KTO", 96.0),
    ("Llama-3-Base-8B-SFT→KTO", "KTO", 81.2),
    ("math-shepherd mistral-7b", "PPO", 80.8),
    ("Llama-3-8B SimPO", "SimPO", 86.5),
    ("Eurus-2-7B SFT→PRIME", "PRIME", 77.0),
]
RL_RANGE = (68.5, 96.0)  # Table 1, min and max
SFT_RANGE = (6.0, 15.0)  # "SFT changes almost everything (6–15% sparsity)"
RFT_SPARSITY = 91.2  # rejection-sampling FT on the policy's own samples
RANK_RANGE = (99.2, 99.8)  # mean rank / min(m, n), %

# Table 6: sparsity vs tolerance (atol 1e-8, 1e-7, 1e-6, 1e-5)
TABLE6_ATOLS = (1e-8, 1e-7, 1e-6, 1e-5)
TABLE6 = {
    "Tulu-3-8B DPO (paper)": (76.04, 76.04, 76.14, 81.38),
    "Eurus-7b KTO (paper)": (71.78, 71.79, 73.14, 95.98),
}

# Training dynamics of PRIME: shares of all parameters
DYNAMICS_PRIME = {"never": 72.0, "returned": 8.0, "final": 20.0}
EVER_UPDATED_OUTSIDE_FINAL = 8.5  # "about 8.5% of parameters ever updated end outside the final subnetwork"
PRIME_PLATEAU = 80.0  # sparsity levels off near 80%


# Table 3: subnetwork-only training from θ_init (same data, hyperparameters and seed) against the full run:
# share of parameters of θ_sub identical to θ_full (|θ_full − θ_sub| ≤ atol), and "test accuracy equal or better".
TABLE3 = {  # algorithm -> {atol: identity %}
    "DPO": {1e-5: 94.0, 1e-4: 100.0},
    "PRIME": {1e-5: 90.5, 1e-4: 100.0},
}
TABLE3_ACCURACY = "θ_sub's test accuracy equal to or better than θ_full's"

# Table 4: overlap of subnetworks (DPO on Tulu-3-8B-SFT unless noted), o1 / o2 in %, with the paper's chance
# baseline (o1 = density of the second mask, o2 = density of the first).
TABLE4 = [  # (comparison, what varies, o1, o2, chance o1, chance o2)
    ("seeds", "DPO, seed 42 vs seed 123", 60.5, 60.6, 36.7, 36.7),
    ("data", "DPO, two training sets", 26.7, 67.1, 14.6, 36.7),
    ("algorithm", "DPO vs PRIME", 59.1, 33.2, 23.0, 12.9),
]
