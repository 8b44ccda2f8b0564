"""The compare step reproduces the hand-made reference tables from a real tracking server.

One module-scoped ``mlflow server`` (SQLite, free port) holds three experiments built from
the numbers of ../shared/reference:

* ``compress-study`` — compress-recover-summary.md: six families × (base, best_acc,
  best_ppl). best_* runs find their "before" values through lineage, three ways: a sibling
  evaluate run sharing the upstream prune run (Llama*), the upstream evaluate run itself
  (Mistral*), and ``before/``-prefixed metrics on the run (Qwen*).
* ``code-dpo`` — code-dpo-comparison.md: ~33 variants × 4 benchmarks × (avg_time, pass@1).
* ``guide`` — the comparison guide's base vs LoRA workflow, with stderr for significance.

The reference printed rounded numbers but computed changes from unrounded ones, so the runs
log unrounded values solved to print exactly as the reference does (``_solve_*`` below); the
assertions then compare every rendered figure with the reference at its printed precision.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal

import pytest

from mlflow_server import start_server

# compress-recover-summary.md, main table: family|role|params_b|ppl_before|ppl_after|ppl_change_pct|acc_before|acc_after|acc_change_pct
COMPRESS_MAIN = """
Llama|base|8.03|N/A|6.1|N/A|N/A|0.6997|N/A
Llama|best_acc|6.42|13.39|10.78|-19.46|0.5946|0.6492|9.19
Llama|best_ppl|6.42|11.82|10.18|-13.91|0.5665|0.6311|11.41
Llama-Instruct|base|8.03|N/A|8.26|N/A|N/A|0.699|N/A
Llama-Instruct|best_acc|6.42|13.29|11.28|-15.1|0.6318|0.6477|2.52
Llama-Instruct|best_ppl|6.42|13.2|11.28|-14.57|0.6247|0.6487|3.84
Mistral|base|7.25|N/A|5.38|N/A|N/A|0.7047|N/A
Mistral|best_acc|5.8|15.22|10.46|-31.27|0.5861|0.6246|6.57
Mistral|best_ppl|5.8|9.69|7.68|-20.78|0.5332|0.6105|14.5
Mistral-Instruct|base|7.25|N/A|5.56|N/A|N/A|0.7348|N/A
Mistral-Instruct|best_acc|5.8|24.33|12.15|-50.05|0.6552|0.6653|1.55
Mistral-Instruct|best_ppl|5.8|9.09|7.79|-14.34|0.6023|0.6375|5.85
Qwen|base|7.62|N/A|6.81|N/A|N/A|0.7022|N/A
Qwen|best_acc|6.09|14.46|11.4|-21.15|0.6094|0.6476|6.27
Qwen|best_ppl|6.09|11.45|10.32|-9.87|0.5633|0.6197|10.01
Qwen-Instruct|base|7.62|N/A|7.39|N/A|N/A|0.7174|N/A
Qwen-Instruct|best_acc|6.09|13.42|10.62|-20.86|0.6202|0.6504|4.87
Qwen-Instruct|best_ppl|6.09|12.69|10.45|-17.67|0.6116|0.6354|3.9
"""
# per task: family|role|before|after|change
COMPRESS_TASKS = {
    "boolq": """
Llama|base|N/A|0.8131|N/A
Llama|best_acc|0.6642|0.8174|0.1532
Llama|best_ppl|0.6306|0.7599|0.1293
Llama-Instruct|base|N/A|0.8306|N/A
Llama-Instruct|best_acc|0.8309|0.833|0.0021
Llama-Instruct|best_ppl|0.8211|0.8229|0.0018
Mistral|base|N/A|0.8214|N/A
Mistral|best_acc|0.7642|0.7994|0.0352
Mistral|best_ppl|0.6505|0.7021|0.0516
Mistral-Instruct|base|N/A|0.8587|N/A
Mistral-Instruct|best_acc|0.7462|0.8083|0.0621
Mistral-Instruct|best_ppl|0.6361|0.7508|0.1147
Qwen|base|N/A|0.8465|N/A
Qwen|best_acc|0.8147|0.8046|-0.0101
Qwen|best_ppl|0.5654|0.6823|0.1169
Qwen-Instruct|base|N/A|0.8642|N/A
Qwen-Instruct|best_acc|0.77|0.8055|0.0355
Qwen-Instruct|best_ppl|0.6878|0.7737|0.0859
""",
    "piqa": """
Llama|base|N/A|0.8079|N/A
Llama|best_acc|0.7437|0.7666|0.0229
Llama|best_ppl|0.7361|0.7682|0.0321
Llama-Instruct|base|N/A|0.7862|N/A
Llama-Instruct|best_acc|0.7399|0.7486|0.0087
Llama-Instruct|best_ppl|0.7399|0.7535|0.0136
Mistral|base|N/A|0.8226|N/A
Mistral|best_acc|0.7182|0.7361|0.0179
Mistral|best_ppl|0.7612|0.7905|0.0293
Mistral-Instruct|base|N/A|0.8264|N/A
Mistral-Instruct|best_acc|0.8041|0.8025|-0.0016
Mistral-Instruct|best_ppl|0.7709|0.7927|0.0218
Qwen|base|N/A|0.7982|N/A
Qwen|best_acc|0.7285|0.7535|0.025
Qwen|best_ppl|0.7476|0.7666|0.019
Qwen-Instruct|base|N/A|0.8036|N/A
Qwen-Instruct|best_acc|0.7459|0.7622|0.0163
Qwen-Instruct|best_ppl|0.7677|0.7715|0.0038
""",
    "hellaswag": """
Llama|base|N/A|0.7916|N/A
Llama|best_acc|0.6391|0.701|0.0619
Llama|best_ppl|0.6226|0.6926|0.07
Llama-Instruct|base|N/A|0.7581|N/A
Llama-Instruct|best_acc|0.6562|0.7002|0.044
Llama-Instruct|best_ppl|0.6466|0.6994|0.0528
Mistral|base|N/A|0.8042|N/A
Mistral|best_acc|0.6231|0.6958|0.0727
Mistral|best_ppl|0.5777|0.7093|0.1316
Mistral-Instruct|base|N/A|0.8293|N/A
Mistral-Instruct|best_acc|0.7297|0.7552|0.0255
Mistral-Instruct|best_ppl|0.6752|0.7255|0.0503
Qwen|base|N/A|0.7892|N/A
Qwen|best_acc|0.6405|0.6957|0.0552
Qwen|best_ppl|0.6548|0.7023|0.0475
Qwen-Instruct|base|N/A|0.8046|N/A
Qwen-Instruct|best_acc|0.6851|0.7113|0.0262
Qwen-Instruct|best_ppl|0.6886|0.7138|0.0252
""",
    "winogrande": """
Llama|base|N/A|0.7261|N/A
Llama|best_acc|0.6906|0.6906|0.0
Llama|best_ppl|0.6709|0.6803|0.0094
Llama-Instruct|base|N/A|0.7206|N/A
Llama-Instruct|best_acc|0.693|0.6922|-0.0008
Llama-Instruct|best_ppl|0.6843|0.6946|0.0103
Mistral|base|N/A|0.7372|N/A
Mistral|best_acc|0.6401|0.6622|0.0221
Mistral|best_ppl|0.588|0.6164|0.0284
Mistral-Instruct|base|N/A|0.7419|N/A
Mistral-Instruct|best_acc|0.6077|0.6622|0.0545
Mistral-Instruct|best_ppl|0.603|0.614|0.011
Qwen|base|N/A|0.7285|N/A
Qwen|best_acc|0.6709|0.6748|0.0039
Qwen|best_ppl|0.6251|0.6377|0.0126
Qwen-Instruct|base|N/A|0.7064|N/A
Qwen-Instruct|best_acc|0.6322|0.6693|0.0371
Qwen-Instruct|best_ppl|0.5943|0.6101|0.0158
""",
    "arc_easy": """
Llama|base|N/A|0.7765|N/A
Llama|best_acc|0.6216|0.7071|0.0855
Llama|best_ppl|0.5694|0.681|0.1116
Llama-Instruct|base|N/A|0.798|N/A
Llama-Instruct|best_acc|0.6751|0.6923|0.0172
Llama-Instruct|best_ppl|0.6679|0.6978|0.0299
Mistral|base|N/A|0.7824|N/A
Mistral|best_acc|0.6002|0.6671|0.0669
Mistral|best_ppl|0.4891|0.6591|0.17
Mistral-Instruct|base|N/A|0.8262|N/A
Mistral-Instruct|best_acc|0.7534|0.7269|-0.0265
Mistral-Instruct|best_ppl|0.6953|0.7201|0.0248
Qwen|base|N/A|0.7731|N/A
Qwen|best_acc|0.6503|0.7281|0.0778
Qwen|best_ppl|0.5926|0.6932|0.1006
Qwen-Instruct|base|N/A|0.8089|N/A
Qwen-Instruct|best_acc|0.6721|0.7079|0.0358
Qwen-Instruct|best_ppl|0.6886|0.7016|0.013
""",
    "arc_challenge": """
Llama|base|N/A|0.5324|N/A
Llama|best_acc|0.3951|0.448|0.0529
Llama|best_ppl|0.3797|0.4317|0.052
Llama-Instruct|base|N/A|0.5674|N/A
Llama-Instruct|best_acc|0.4454|0.4676|0.0222
Llama-Instruct|best_ppl|0.4369|0.4744|0.0375
Mistral|base|N/A|0.523|N/A
Mistral|best_acc|0.3848|0.4317|0.0469
Mistral|best_ppl|0.3003|0.3942|0.0939
Mistral-Instruct|base|N/A|0.5887|N/A
Mistral-Instruct|best_acc|0.5094|0.4804|-0.029
Mistral-Instruct|best_ppl|0.4258|0.4497|0.0239
Qwen|base|N/A|0.5102|N/A
Qwen|best_acc|0.407|0.4787|0.0717
Qwen|best_ppl|0.3933|0.4556|0.0623
Qwen-Instruct|base|N/A|0.5503|N/A
Qwen-Instruct|best_acc|0.4198|0.4744|0.0546
Qwen-Instruct|best_ppl|0.4565|0.4514|-0.0051
""",
    "openbookqa": """
Llama|base|N/A|0.45|N/A
Llama|best_acc|0.408|0.414|0.006
Llama|best_ppl|0.356|0.404|0.048
Llama-Instruct|base|N/A|0.432|N/A
Llama-Instruct|best_acc|0.382|0.4|0.018
Llama-Instruct|best_ppl|0.376|0.398|0.022
Mistral|base|N/A|0.442|N/A
Mistral|best_acc|0.372|0.38|0.008
Mistral|best_ppl|0.366|0.402|0.036
Mistral-Instruct|base|N/A|0.472|N/A
Mistral-Instruct|best_acc|0.436|0.422|-0.014
Mistral-Instruct|best_ppl|0.41|0.41|0.0
Qwen|base|N/A|0.47|N/A
Qwen|best_acc|0.354|0.398|0.044
Qwen|best_ppl|0.364|0.4|0.036
Qwen-Instruct|base|N/A|0.484|N/A
Qwen-Instruct|best_acc|0.416|0.422|0.006
Qwen-Instruct|best_ppl|0.398|0.426|0.028
""",
}
# code-dpo-comparison.md. table: run|avg_time|pass@1|time mark|pass mark (gold/silver/bronze/worst/-)
# delta vs sft-25-original-data-1b: run|avg_time delta|speedup|pass@1 delta|colour of each (good/bad/-)
CODE_DPO = {
    "mbppplus": {
        "table": """
sft-codedpo|2400984.91|0.1459|-|-
sft-25-original-data-1b-dpo-pvf-qsl|2391965.38|0.1697|-|bronze
sft-25-original-data-1b-dpo-qfs|2380615.93|0.1560|gold|-
sft-25-original-data-1b-dpo-pvf-qra|2389976.76|0.1713|-|gold
sft-25-original-data-1b-dpo-qsl|2400639.12|0.1379|-|-
startcode1b-original-data-dpo-pvf-qts|2386640.07|0.0926|-|-
startcode1b-original-data-dpo-pvf-qra|2384107.24|0.1236|silver|-
startcode1b-original-data-dpo-pvf-qsl|2386117.68|0.1111|bronze|-
startcode1b-original-data-dpo-pvf-qfs|2388721.33|0.1226|-|-
sft-25-original-data-1b-dpo-pvf|2390199.21|0.1429|-|-
sft-25-original-data-1b-sft-1|2426774.06|0.1283|worst|-
sft-25-original-data-1b-dpo-pvf-qfs|2419096.29|0.1699|-|silver
sft-25-original-data-1b-dpo-pvf-qts|2399194.70|0.1525|-|-
codedpo|2392069.73|0.0836|-|worst
sft-25-original-data-1b-dpo-qts|2403430.52|0.1040|-|-
sft-optimise|2409526.18|0.1371|-|-
optimise|2395815.36|0.0837|-|-
sft-25-original-data-1b-dpo-qra|2389638.60|0.1678|-|-
sft-25-original-data-1b|2412874.89|0.0947|-|-
""",
        "delta": """
sft-codedpo|-11889.98|1.00x|+0.0512|good|-|good
sft-25-original-data-1b-dpo-pvf-qsl|-20909.50|1.01x|+0.0750|good|good|good
sft-25-original-data-1b-dpo-qfs|-32258.96|1.01x|+0.0613|good|good|good
sft-25-original-data-1b-dpo-pvf-qra|-22898.13|1.01x|+0.0766|good|good|good
sft-25-original-data-1b-dpo-qsl|-12235.76|1.01x|+0.0431|good|good|good
startcode1b-original-data-dpo-pvf-qts|-26234.82|1.01x|-0.0021|good|good|bad
startcode1b-original-data-dpo-pvf-qra|-28767.64|1.01x|+0.0289|good|good|good
startcode1b-original-data-dpo-pvf-qsl|-26757.20|1.01x|+0.0164|good|good|good
startcode1b-original-data-dpo-pvf-qfs|-24153.56|1.01x|+0.0279|good|good|good
sft-25-original-data-1b-dpo-pvf|-22675.68|1.01x|+0.0482|good|good|good
sft-25-original-data-1b-sft-1|+13899.18|0.99x|+0.0336|bad|bad|good
sft-25-original-data-1b-dpo-pvf-qfs|+6221.40|1.00x|+0.0752|bad|-|good
sft-25-original-data-1b-dpo-pvf-qts|-13680.18|1.01x|+0.0578|good|good|good
codedpo|-20805.16|1.01x|-0.0111|good|good|bad
sft-25-original-data-1b-dpo-qts|-9444.37|1.00x|+0.0093|good|-|good
sft-optimise|-3348.70|1.00x|+0.0424|good|-|good
optimise|-17059.53|1.01x|-0.0110|good|good|bad
sft-25-original-data-1b-dpo-qra|-23236.29|1.01x|+0.0731|good|good|good
""",
        "lists": [["sft-pvf-qsl", "sft-qfs", "sft-pvf-qra", "sft-qra"], ["pvf-qts", "pvf-qra", "pvf-qsl", "pvf-qfs", "sft-pvf"]],
    },
    "mbpp": {
        "table": """
sft-25-original-data-1b-dpo-0.3qsl-0.2qts-0.5qfs|113046.06|0.1453|-|-
sft-codedpo|111384.71|0.1138|-|-
sft-25-original-data-1b-dpo-0.5qsl-0.5qts|117525.75|0.1305|-|-
sft-25-original-data-1b-dpo-pvf-qsl|123402.04|0.1351|-|-
sft-25-original-data-1b-dpo-qfs|111653.21|0.1499|-|bronze
sft-25-original-data-1b-dpo-pvf-qra|120240.77|0.1342|-|-
sft-25-original-data-1b-dpo-0.2qsl-0.3qts-0.5qfs|121924.19|0.1198|-|-
sft-25-original-data-1b-dpo-qsl|117952.04|0.1399|-|-
sft-25-original-data-1b-dpo-0.5qts-0.5qfs|118036.06|0.1258|-|-
sft-25-original-data-1b-dpo-0.5qra-0.5qsl|113499.44|0.1469|-|-
startcode1b-original-data-dpo-pvf-qts|109003.60|0.0706|-|-
sft-25-original-data-1b-dpo-0.5pvf-0.5qts|123876.02|0.1167|-|-
startcode1b-original-data-dpo-pvf|110234.59|0.0657|-|-
sft-25-original-data-1b-dpo-0.5qra-0.5qfs|114368.02|0.1447|-|-
sft-25-original-data-1b-dpo-0.5qra-0.5qts|122107.74|0.1268|-|-
startcode1b-original-data-dpo-pvf-qra|103704.80|0.0957|gold|-
startcode1b-original-data-dpo-pvf-qsl|104042.74|0.0922|silver|-
startcode1b-original-data-dpo-pvf-qfs|104079.26|0.1005|bronze|-
sft-25-original-data-1b-dpo-pvf|118963.15|0.1302|-|-
sft-25-original-data-1b-dpo-0.5pvf-0.5qfs|118820.66|0.1360|-|-
sft-25-original-data-1b-dpo-pvf-qfs|115512.28|0.1306|-|-
original-data|111893.93|1.0000|-|gold
sft-25-original-data-1b-dpo-pvf-qts|131881.13|0.1205|-|-
codedpo|112972.16|0.0620|-|worst
sft-25-original-data-1b-dpo-qts|124349.25|0.1052|-|-
startcode1b-original-data-sft-1|152894.36|0.0875|worst|-
sft-optimise|115403.10|0.1103|-|-
optimise|113053.20|0.0642|-|-
sft-25-original-data-1b-dpo-0.5qsl-0.5qfs|113162.96|0.1511|-|silver
sft-25-original-data-1b-dpo-0.5pvf-0.5qsl|120603.98|0.1373|-|-
sft-25-original-data-1b-dpo-qra|121600.25|0.1480|-|-
sft-25-original-data-1b|129490.12|0.0901|-|-
sft-25-original-data-1b-dpo-0.5pvf-0.5qra|127771.48|0.1370|-|-
""",
        "delta": """
sft-25-original-data-1b-dpo-0.3qsl-0.2qts-0.5qfs|-16444.06|1.15x|+0.0552|good|good|good
sft-codedpo|-18105.41|1.16x|+0.0237|good|good|good
sft-25-original-data-1b-dpo-0.5qsl-0.5qts|-11964.37|1.10x|+0.0404|good|good|good
sft-25-original-data-1b-dpo-pvf-qsl|-6088.09|1.05x|+0.0450|good|good|good
sft-25-original-data-1b-dpo-qfs|-17836.92|1.16x|+0.0598|good|good|good
sft-25-original-data-1b-dpo-pvf-qra|-9249.35|1.08x|+0.0441|good|good|good
sft-25-original-data-1b-dpo-0.2qsl-0.3qts-0.5qfs|-7565.93|1.06x|+0.0297|good|good|good
sft-25-original-data-1b-dpo-qsl|-11538.08|1.10x|+0.0498|good|good|good
sft-25-original-data-1b-dpo-0.5qts-0.5qfs|-11454.07|1.10x|+0.0357|good|good|good
sft-25-original-data-1b-dpo-0.5qra-0.5qsl|-15990.69|1.14x|+0.0568|good|good|good
startcode1b-original-data-dpo-pvf-qts|-20486.52|1.19x|-0.0195|good|good|bad
sft-25-original-data-1b-dpo-0.5pvf-0.5qts|-5614.11|1.05x|+0.0266|good|good|good
startcode1b-original-data-dpo-pvf|-19255.53|1.17x|-0.0244|good|good|bad
sft-25-original-data-1b-dpo-0.5qra-0.5qfs|-15122.11|1.13x|+0.0546|good|good|good
sft-25-original-data-1b-dpo-0.5qra-0.5qts|-7382.38|1.06x|+0.0366|good|good|good
startcode1b-original-data-dpo-pvf-qra|-25785.32|1.25x|+0.0056|good|good|good
startcode1b-original-data-dpo-pvf-qsl|-25447.38|1.24x|+0.0021|good|good|good
startcode1b-original-data-dpo-pvf-qfs|-25410.86|1.24x|+0.0103|good|good|good
sft-25-original-data-1b-dpo-pvf|-10526.97|1.09x|+0.0401|good|good|good
sft-25-original-data-1b-dpo-0.5pvf-0.5qfs|-10669.46|1.09x|+0.0459|good|good|good
sft-25-original-data-1b-dpo-pvf-qfs|-13977.84|1.12x|+0.0404|good|good|good
original-data|-17596.19|1.16x|+0.9099|good|good|good
sft-25-original-data-1b-dpo-pvf-qts|+2391.00|0.98x|+0.0304|bad|bad|good
codedpo|-16517.96|1.15x|-0.0281|good|good|bad
sft-25-original-data-1b-dpo-qts|-5140.87|1.04x|+0.0151|good|good|good
startcode1b-original-data-sft-1|+23404.24|0.85x|-0.0026|bad|bad|bad
sft-optimise|-14087.02|1.12x|+0.0202|good|good|good
optimise|-16436.92|1.15x|-0.0259|good|good|bad
sft-25-original-data-1b-dpo-0.5qsl-0.5qfs|-16327.16|1.14x|+0.0610|good|good|good
sft-25-original-data-1b-dpo-0.5pvf-0.5qsl|-8886.14|1.07x|+0.0472|good|good|good
sft-25-original-data-1b-dpo-qra|-7889.87|1.06x|+0.0579|good|good|good
sft-25-original-data-1b-dpo-0.5pvf-0.5qra|-1718.64|1.01x|+0.0468|good|good|good
""",
        "lists": [["pvf-qts", "pvf", "pvf-qra", "pvf-qsl", "pvf-qfs"]],
    },
    "humaneval": {
        "table": """
sft-25-original-data-1b-dpo-0.3qsl-0.2qts-0.5qfs|196514.11|0.1111|-|-
sft-codedpo|244828.90|0.0991|-|-
sft-25-original-data-1b-dpo-0.5qsl-0.5qts|224516.12|0.1122|-|-
sft-25-original-data-1b-dpo-pvf-qsl|203864.84|0.1230|-|silver
sft-25-original-data-1b-dpo-qfs|199572.95|0.1116|-|-
sft-25-original-data-1b-dpo-pvf-qra|147666.91|0.1251|-|gold
sft-25-original-data-1b-dpo-0.2qsl-0.3qts-0.5qfs|263421.74|0.1068|-|-
sft-25-original-data-1b-dpo-qsl|180508.80|0.1140|-|-
sft-25-original-data-1b-dpo-0.5qts-0.5qfs|251714.85|0.1071|-|-
sft-25-original-data-1b-dpo-0.5qra-0.5qsl|152529.41|0.1187|-|-
startcode1b-original-data-dpo-pvf-qts|126672.29|0.0727|gold|-
sft-25-original-data-1b-dpo-0.5pvf-0.5qts|233361.19|0.1053|-|-
startcode1b-original-data-dpo-pvf|321155.49|0.0730|worst|-
sft-25-original-data-1b-dpo-0.5qra-0.5qfs|142974.20|0.1182|bronze|-
sft-25-original-data-1b-dpo-0.5qra-0.5qts|232347.74|0.1102|-|-
startcode1b-original-data-dpo-pvf-qra|205045.27|0.0825|-|-
startcode1b-original-data-dpo-pvf-qsl|188620.36|0.0764|-|-
startcode1b-original-data-dpo-pvf-qfs|305765.62|0.0809|-|-
sft-25-original-data-1b-dpo-pvf|163131.42|0.1185|-|-
sft-25-original-data-1b-dpo-0.5pvf-0.5qfs|218110.18|0.1079|-|-
sft-25-original-data-1b-dpo-pvf-qfs|176009.49|0.1183|-|-
sft-25-original-data-1b-dpo-pvf-qts|148688.89|0.1184|-|-
codedpo|248412.54|0.0704|-|worst
sft-25-original-data-1b-dpo-qts|243661.31|0.1042|-|-
startcode1b-original-data-sft-1|133612.54|0.1005|silver|-
sft-optimise|242294.59|0.1027|-|-
optimise|221468.64|0.0742|-|-
sft-25-original-data-1b-dpo-0.5qsl-0.5qfs|188892.28|0.1124|-|-
sft-25-original-data-1b-dpo-0.5pvf-0.5qsl|182894.67|0.1082|-|-
sft-25-original-data-1b-dpo-qra|162440.13|0.1204|-|-
sft-25-original-data-1b|300671.57|0.1014|-|-
sft-25-original-data-1b-dpo-0.5pvf-0.5qra|176834.83|0.1209|-|bronze
""",
        "delta": """
sft-25-original-data-1b-dpo-0.3qsl-0.2qts-0.5qfs|-104157.45|1.53x|+0.0097|good|good|good
sft-codedpo|-55842.67|1.23x|-0.0023|good|good|bad
sft-25-original-data-1b-dpo-0.5qsl-0.5qts|-76155.45|1.34x|+0.0108|good|good|good
sft-25-original-data-1b-dpo-pvf-qsl|-96806.72|1.47x|+0.0216|good|good|good
sft-25-original-data-1b-dpo-qfs|-101098.62|1.51x|+0.0102|good|good|good
sft-25-original-data-1b-dpo-pvf-qra|-153004.66|2.04x|+0.0237|good|good|good
sft-25-original-data-1b-dpo-0.2qsl-0.3qts-0.5qfs|-37249.83|1.14x|+0.0054|good|good|good
sft-25-original-data-1b-dpo-qsl|-120162.77|1.67x|+0.0126|good|good|good
sft-25-original-data-1b-dpo-0.5qts-0.5qfs|-48956.72|1.19x|+0.0057|good|good|good
sft-25-original-data-1b-dpo-0.5qra-0.5qsl|-148142.16|1.97x|+0.0173|good|good|good
startcode1b-original-data-dpo-pvf-qts|-173999.28|2.37x|-0.0287|good|good|bad
sft-25-original-data-1b-dpo-0.5pvf-0.5qts|-67310.38|1.29x|+0.0039|good|good|good
startcode1b-original-data-dpo-pvf|+20483.92|0.94x|-0.0284|bad|bad|bad
sft-25-original-data-1b-dpo-0.5qra-0.5qfs|-157697.37|2.10x|+0.0168|good|good|good
sft-25-original-data-1b-dpo-0.5qra-0.5qts|-68323.83|1.29x|+0.0088|good|good|good
startcode1b-original-data-dpo-pvf-qra|-95626.30|1.47x|-0.0189|good|good|bad
startcode1b-original-data-dpo-pvf-qsl|-112051.20|1.59x|-0.0250|good|good|bad
startcode1b-original-data-dpo-pvf-qfs|+5094.05|0.98x|-0.0205|bad|bad|bad
sft-25-original-data-1b-dpo-pvf|-137540.15|1.84x|+0.0171|good|good|good
sft-25-original-data-1b-dpo-0.5pvf-0.5qfs|-82561.39|1.38x|+0.0065|good|good|good
sft-25-original-data-1b-dpo-pvf-qfs|-124662.08|1.71x|+0.0169|good|good|good
sft-25-original-data-1b-dpo-pvf-qts|-151982.68|2.02x|+0.0170|good|good|good
codedpo|-52259.02|1.21x|-0.0310|good|good|bad
sft-25-original-data-1b-dpo-qts|-57010.25|1.23x|+0.0028|good|good|good
startcode1b-original-data-sft-1|-167059.03|2.25x|-0.0009|good|good|bad
sft-optimise|-58376.97|1.24x|+0.0013|good|good|good
optimise|-79202.93|1.36x|-0.0272|good|good|bad
sft-25-original-data-1b-dpo-0.5qsl-0.5qfs|-111779.29|1.59x|+0.0110|good|good|good
sft-25-original-data-1b-dpo-0.5pvf-0.5qsl|-117776.89|1.64x|+0.0068|good|good|good
sft-25-original-data-1b-dpo-qra|-138231.43|1.85x|+0.0190|good|good|good
sft-25-original-data-1b-dpo-0.5pvf-0.5qra|-123836.74|1.70x|+0.0195|good|good|good
""",
        "lists": [["sft-0.3qsl-0.2qts-0.5qfs", "sft-pvf-qsl", "sft-qfs", "sft-pvf-qra", "sft-qsl", "sft-0.5qra-0.5qsl", "sft-0.5qra-0.5qfs", "sft-pvf", "sft-0.5pvf-0.5qfs", "sft-pvf-qfs", "sft-pvf-qts", "sft-0.5qsl-0.5qfs", "sft-0.5pvf-0.5qsl", "sft-0.5pvf-0.5qra", "sft-qra"], ["pvf-qts", "pvf-qra", "pvf-qsl"], ["sft-codedpo", "pvf-qts", "pvf-qra", "pvf-qsl", "codedpo", "optimise"], ["pvf", "pvf-qfs"]],
    },
    "humanevalplus": {
        "table": """
sft-codedpo|13759895.34|0.0666|worst|-
sft-25-original-data-1b-dpo-pvf-qsl|12553206.40|0.0857|gold|silver
sft-25-original-data-1b-dpo-qfs|13341700.30|0.0730|-|-
sft-25-original-data-1b-dpo-pvf-qra|12802731.54|0.0894|silver|gold
sft-25-original-data-1b-dpo-qsl|13067472.07|0.0760|-|-
startcode1b-original-data-dpo-pvf-qts|12986944.58|0.0565|-|-
startcode1b-original-data-dpo-pvf-qra|13154605.51|0.0637|-|-
startcode1b-original-data-dpo-pvf-qsl|12996166.07|0.0577|-|-
startcode1b-original-data-dpo-pvf-qfs|13264023.90|0.0602|-|-
sft-25-original-data-1b-dpo-pvf|13141814.67|0.0823|-|-
sft-25-original-data-1b-sft-1|13010269.05|0.0707|-|-
sft-25-original-data-1b-dpo-pvf-qfs|13044557.88|0.0843|-|bronze
sft-25-original-data-1b-dpo-pvf-qts|12995184.77|0.0799|-|-
codedpo|13546593.57|0.0518|-|worst
sft-25-original-data-1b-dpo-qts|13060078.53|0.0657|-|-
sft-optimise|13672029.98|0.0691|-|-
optimise|13722836.70|0.0541|-|-
sft-25-original-data-1b-dpo-qra|13015695.05|0.0802|-|-
sft-25-original-data-1b|12900094.60|0.0668|bronze|-
""",
        "delta": """
sft-codedpo|+859800.73|0.94x|-0.0002|bad|bad|bad
sft-25-original-data-1b-dpo-pvf-qsl|-346888.20|1.03x|+0.0189|good|good|good
sft-25-original-data-1b-dpo-qfs|+441605.70|0.97x|+0.0062|bad|bad|good
sft-25-original-data-1b-dpo-pvf-qra|-97363.07|1.01x|+0.0226|good|good|good
sft-25-original-data-1b-dpo-qsl|+167377.47|0.99x|+0.0092|bad|bad|good
startcode1b-original-data-dpo-pvf-qts|+86849.98|0.99x|-0.0104|bad|bad|bad
startcode1b-original-data-dpo-pvf-qra|+254510.91|0.98x|-0.0032|bad|bad|bad
startcode1b-original-data-dpo-pvf-qsl|+96071.47|0.99x|-0.0091|bad|bad|bad
startcode1b-original-data-dpo-pvf-qfs|+363929.29|0.97x|-0.0066|bad|bad|bad
sft-25-original-data-1b-dpo-pvf|+241720.07|0.98x|+0.0155|bad|bad|good
sft-25-original-data-1b-sft-1|+110174.45|0.99x|+0.0039|bad|bad|good
sft-25-original-data-1b-dpo-pvf-qfs|+144463.27|0.99x|+0.0174|bad|bad|good
sft-25-original-data-1b-dpo-pvf-qts|+95090.17|0.99x|+0.0130|bad|bad|good
codedpo|+646498.97|0.95x|-0.0150|bad|bad|bad
sft-25-original-data-1b-dpo-qts|+159983.93|0.99x|-0.0011|bad|bad|bad
sft-optimise|+771935.38|0.94x|+0.0023|bad|bad|good
optimise|+822742.09|0.94x|-0.0127|bad|bad|bad
sft-25-original-data-1b-dpo-qra|+115600.44|0.99x|+0.0134|bad|bad|good
""",
        "lists": [["sft-pvf-qsl", "sft-qfs", "sft-pvf-qra", "sft-qsl", "sft-pvf", "sft-pvf-qfs", "sft-pvf-qts", "sft-qra"], ["pvf-qts", "pvf-qra", "pvf-qsl", "pvf-qfs", "sft-qts", "pvf"], ["sft-pvf-qsl", "sft-pvf-qra"]],
    },
}

TASKS = list(COMPRESS_TASKS)
# Which metric the reference took per task (README: acc_norm where reported, else acc).
TASK_METRIC = {"boolq": "acc", "piqa": "acc_norm", "hellaswag": "acc_norm",
               "winogrande": "acc", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
               "openbookqa": "acc_norm"}
BASELINE = "sft-25-original-data-1b"
BEST_OF_FOUR = "name:sft-codedpo|name:sft-optimise|name:codedpo|name:optimise"


def _rows(text: str) -> list[list[str]]:
    return [line.split("|") for line in text.strip().splitlines()]


# ----------------------------------------------------------------------------- unrounding

def _solve_pct(before: str, after: str, pct: str, unit: float) -> tuple[float, float]:
    """Unrounded (before, after) printing as ``before``/``after`` (``unit`` = last printed
    digit) whose percent change prints as ``pct`` (2 decimals), with the widest margin."""
    b0, a0, p0 = float(before), float(after), float(pct)
    best = None
    n = 24
    for i in range(-n + 1, n):
        b = b0 + i * unit / (2 * n)
        for j in range(-n + 1, n):
            a = a0 + j * unit / (2 * n)
            margin = 0.005 - abs((a - b) / b * 100 - p0)
            if margin > 0 and (best is None or margin > best[0]):
                best = (margin, b, a)
    assert best is not None and best[0] > 1e-4, (before, after, pct)
    return best[1], best[2]


def _solve_deltas(values: dict[str, str], base: str, deltas: dict[str, str]) -> dict[str, float]:
    """Unrounded values printing as ``values`` whose differences from ``values[base]`` print
    as ``deltas`` (the reference subtracted unrounded numbers, then rounded)."""
    unit = float(Decimal(1).scaleb(Decimal(values[base]).as_tuple().exponent))
    err = {k: float(Decimal(d) - (Decimal(values[k]) - Decimal(values[base])))
           for k, d in deltas.items()}
    best = None
    for i in range(-9, 10):
        ob = i * unit / 20
        lo_hi = {}
        for k, e in err.items():  # need v_k - v_base - (printed diff) within ±unit/2
            lo = max(-unit / 2, e + ob - unit / 2)
            hi = min(unit / 2, e + ob + unit / 2)
            lo_hi[k] = (lo, hi)
        margin = min((hi - lo) / 2 for lo, hi in lo_hi.values())
        if margin > 0 and (best is None or margin > best[0]):
            best = (margin, ob, lo_hi)
    assert best is not None and best[0] > unit / 50, (base, err)
    _, ob, lo_hi = best
    out = {k: float(v) for k, v in values.items()}
    out[base] = float(values[base]) + ob
    for k, (lo, hi) in lo_hi.items():
        out[k] = float(values[k]) + (lo + hi) / 2
    return out


# ----------------------------------------------------------------------------- run factory

class Maker:
    def __init__(self, client):
        self.client = client
        self.t = 1_700_000_000_000

    def run(self, exp_id, name, metrics=None, tags=None, status="FINISHED"):
        from mlflow.entities import Metric

        self.t += 1000
        run = self.client.create_run(exp_id, start_time=self.t, run_name=name,
                                     tags={k: str(v) for k, v in (tags or {}).items()})
        rid = run.info.run_id
        if metrics:
            self.client.log_batch(rid, metrics=[Metric(k, float(v), self.t, 0)
                                                for k, v in metrics.items()])
        self.client.set_terminated(rid, status=status, end_time=self.t + 500)
        return rid


def _task_metrics(i: int, which: int, prefix: str = "") -> dict[str, float]:
    """Per-task scores of main-table row ``i`` (``which``: 2 = before, 3 = after) under the
    metric the reference used, plus decoys that a wrong preference would pick up."""
    out = {}
    for t in TASKS:
        v = float(_rows(COMPRESS_TASKS[t])[i][which])
        m = TASK_METRIC[t]
        out[f"{prefix}{t}/{m}"] = v
        out[f"{prefix}{t}/{m}_stderr"] = 0.01
        decoy = "acc" if m == "acc_norm" else "acc_norm"
        out[f"{prefix}{t}/{decoy}"] = v - 0.05  # boolq/winogrande: the tag says acc
    return out


def _populate_compress(mk: Maker, exp_id: str) -> dict:
    ids = {}
    tag_json = json.dumps(TASK_METRIC)
    for i, row in enumerate(_rows(COMPRESS_MAIN)):
        fam, role, params, ppl_b, ppl_a, ppl_pct, acc_b, acc_a, acc_pct = row
        tags = {"mlproject.family": fam, "mlproject.base_model": fam.lower(),
                "mlproject.avg_acc_metrics": tag_json}
        after = _task_metrics(i, 3)
        after["params_b"] = float(params)
        if role == "base":
            after.update({"ppl/wikitext2": float(ppl_a), "avg_acc": float(acc_a)})
            ids[(fam, role)] = mk.run(exp_id, f"evaluate:{fam}", after,
                                      {**tags, "mlproject.step": "evaluate",
                                       "mlproject.role": "base",
                                       "mlproject.model": fam.lower()})
            continue
        pb, pa = _solve_pct(ppl_b, ppl_a, ppl_pct, 0.01)
        ab, aa = _solve_pct(acc_b, acc_a, acc_pct, 0.0001)
        after.update({"ppl/wikitext2": pa, "avg_acc": aa})
        before = _task_metrics(i, 2)
        before.update({"ppl/wikitext2": pb, "avg_acc": ab})
        ft_tags = {**tags, "mlproject.step": "finetune", "mlproject.role": role}
        if fam.startswith("Llama"):
            # prune run (no metrics) ← evaluate run of the pruned model; finetune ← prune
            prune = mk.run(exp_id, f"prune:{fam}:{role}", {"params_b": float(params)},
                           {**tags, "mlproject.step": "prune"})
            mk.run(exp_id, f"evaluate:{fam}:{role}:pruned", before,
                   {**tags, "mlproject.step": "evaluate", "mlproject.upstream_run": prune})
            ft_tags["mlproject.upstream_run"] = prune
        elif fam.startswith("Mistral"):
            ev = mk.run(exp_id, f"evaluate:{fam}:{role}:pruned", before,
                        {**tags, "mlproject.step": "evaluate"})
            ft_tags["mlproject.upstream_run"] = ev
        else:  # Qwen: eval_before logged on the fine-tune run itself
            after.update({f"before/{k}": v for k, v in before.items()})
        ids[(fam, role)] = mk.run(exp_id, f"finetune:{fam}:{role}", after, ft_tags)
    return ids


def _populate_code_dpo(mk: Maker, exp_id: str) -> dict:
    values: dict[str, dict[str, float]] = {}
    for bench, ref in CODE_DPO.items():
        table = {r[0]: r for r in _rows(ref["table"])}
        delta = {r[0]: r for r in _rows(ref["delta"])}
        times = _solve_deltas({k: r[1] for k, r in table.items()}, BASELINE,
                              {k: r[1] for k, r in delta.items()})
        passes = _solve_deltas({k: r[2] for k, r in table.items()}, BASELINE,
                               {k: r[3] for k, r in delta.items()})
        for name in table:
            m = values.setdefault(name, {})
            m[f"{bench}/avg_time"] = times[name]
            m[f"{bench}/pass_at_1"] = passes[name]  # MLflow forbids '@' in metric names
    return {name: mk.run(exp_id, name, m, {"mlproject.step": "evaluate"})
            for name, m in values.items()}


GUIDE = {  # task/metric: (base, fine-tuned, stderr or None)
    "drop/f1": (0.1050, 0.2652, 0.0030),
    "winogrande/acc": (0.5801, 0.5730, 0.0139),
    "gsm8k/exact_match_flexible-extract": (0.3025, 0.3358, 0.0127),
    "gsm8k/exact_match_strict-match": (0.2100, 0.1000, 0.0110),
    "math/math_verify": (0.1200, 0.1560, 0.0046),
    "math/exact_match": (0.1000, 0.0500, 0.0040),
    "mmlu_abstract_algebra/acc": (0.3000, 0.2800, 0.0460),
    "mmlu_college_physics/acc": (0.2500, 0.3100, 0.0430),
    "mmlu_astronomy/acc": (0.4000, 0.4000, None),
    "mmlu_anatomy/acc": (0.3500, 0.3900, None),
}


def _populate_guide(mk: Maker, exp_id: str) -> dict:
    out = {}
    for which, name in ((0, "Qwen2.5-Coder-0.5B"), (1, "Qwen2.5-Coder-0.5B+lora-ckpt6000")):
        m = {}
        for key, vals in GUIDE.items():
            m[key] = vals[which]
            if vals[2] is not None:
                m[f"{key}_stderr"] = vals[2]
        m["ppl/offline"] = (12.0, 11.0)[which]
        out[which] = mk.run(exp_id, name, m, {"mlproject.step": "evaluate"})
    # partial data: a crashed run with one metric, and one with none
    out["partial"] = mk.run(exp_id, "crashed", {"drop/f1": 0.2}, status="FAILED")
    out["empty"] = mk.run(exp_id, "empty", {}, status="FAILED")
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import os

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    from mlflow import MlflowClient

    with start_server(tmp_path_factory.mktemp("mlflow")) as uri:
        client = MlflowClient(uri)
        mk = Maker(client)
        ids = {
            "compress": _populate_compress(mk, client.create_experiment("compress-study")),
            "code": _populate_code_dpo(mk, client.create_experiment("code-dpo")),
            "guide": _populate_guide(mk, client.create_experiment("guide")),
        }
        yield uri, ids


# ----------------------------------------------------------------------------- parsing

def _md_tables(md: str) -> dict[str, list[dict[str, str]]]:
    """Markdown → {heading: [row dicts]} for every table under a heading."""
    out, heading, header = {}, None, None
    for line in md.splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("#").strip(), None
        elif line.startswith("|") and heading is not None:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if header is None:
                header = cells
                out[heading] = []
            elif not set("".join(cells)) <= set(":-"):
                out[heading].append(dict(zip(header, cells, strict=True)))
        else:
            header = None if not line.startswith("|") else header
    return out


def _num(cell: str) -> float | None:
    m = re.search(r"[-+]?\d+(\.\d+)?", cell)
    return None if cell == "N/A" or m is None else float(m.group(0))


def _mark(cell: str) -> str:
    for emoji, name in (("🥇", "gold"), ("🥈", "silver"), ("🥉", "bronze"), ("🔻", "worst"),
                        ("🟢", "good"), ("🔴", "bad")):
        if emoji in cell:
            return name
    return "-"


def _same(cell: str, ref: str) -> bool:
    """Rendered cell equals the reference figure at the reference's printed precision."""
    if ref == "N/A":
        return cell == "N/A"
    v = _num(cell)
    return v is not None and math.isclose(v, float(ref.rstrip("x")), abs_tol=1e-9)


def _build(uri, **params):
    from mlproject.compare import CompareSpec, build

    return build(uri, CompareSpec.from_params(**params))


# ----------------------------------------------------------------------------- tests

def test_summary_reproduces_compress_recover_reference(server, tmp_path):
    uri, ids = server
    res = _build(uri, experiment="compress-study", view="summary")
    tables = _md_tables(res.markdown())
    main = tables["Summary: before → after fine-tuning"]
    ref = _rows(COMPRESS_MAIN)
    assert [(r["Family"], r["Role"]) for r in main] == [(r[0], r[1]) for r in ref]
    cols = ["Params (B)", "PPL before (wikitext2)", "PPL after (wikitext2)",
            "PPL change % (wikitext2)", "Mean acc before", "Mean acc after",
            "Mean acc change %"]
    for got, want in zip(main, ref, strict=True):
        for col, ref_val in zip(cols, want[2:], strict=True):
            assert _same(got[col], ref_val), (want[:2], col, got[col], ref_val)
    for task in TASKS:
        rows = tables[f"{task} ({TASK_METRIC[task]})"]
        ref_rows = _rows(COMPRESS_TASKS[task])
        assert len(rows) == len(ref_rows)
        for got, want in zip(rows, ref_rows, strict=True):
            assert (got["Family"], got["Role"]) == (want[0], want[1])
            for col, ref_val in zip(["Before", "After", "Change"], want[2:], strict=True):
                assert _same(got[col], ref_val), (task, want[:2], col, got[col], ref_val)
    # pruned-model evaluations and prune runs are "before" sources, not rows
    assert len(res.tables["summary"]) == 18
    # unrounded arithmetic: the CSV keeps full precision
    llama = res.tables["summary"].set_index(["family", "role"]).loc[("Llama", "best_acc")]
    assert llama["ppl_change_pct[wikitext2]"] == pytest.approx(
        (llama["ppl_after[wikitext2]"] - llama["ppl_before[wikitext2]"])
        / llama["ppl_before[wikitext2]"] * 100)
    # every format; PNGs are real images and the HTML embeds them
    names = {p.name for p in res.write(tmp_path)}
    assert {"compare.md", "compare.html", "compare.json", "tidy.csv", "summary.csv",
            "summary_tasks.csv", "delta_bars.png", "acc_vs_ppl.png", "acc_vs_size.png"} <= names
    assert (tmp_path / "acc_vs_ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "compare.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "-19.46" in html


def test_ranking_reproduces_code_dpo_medals_and_deltas(server, tmp_path):
    uri, _ = server
    res = _build(uri, experiment="code-dpo", view="ranking", baseline=f"name:{BASELINE}",
                 metrics="pass@1,avg_time")
    tables = _md_tables(res.markdown())
    for bench, ref in CODE_DPO.items():
        got = {r["Run"]: r for r in tables[bench]}
        ref_rows = _rows(ref["table"])
        assert set(got) == {r[0] for r in ref_rows}, bench
        for name, t, p, t_mark, p_mark in ref_rows:
            row = got[name]
            assert _same(row["avg_time ↓"], t) and _same(row["pass_at_1 ↑"], p), (bench, name)
            assert _mark(row["avg_time ↓"]) == t_mark, (bench, name, row)
            assert _mark(row["pass_at_1 ↑"]) == p_mark, (bench, name, row)
        delta = {r["Run"]: r for r in tables[f"{bench} vs baseline: {BASELINE}"]}
        ref_delta = _rows(ref["delta"])
        assert set(delta) == {r[0] for r in ref_delta}
        for name, dt, speed, dp, c_dt, c_speed, c_dp in ref_delta:
            row = delta[name]
            assert _same(row["avg_time Δ"], dt), (bench, name, row["avg_time Δ"], dt)
            assert row["avg_time speedup"].endswith(speed), (bench, name, row, speed)
            assert _same(row["pass_at_1 Δ"], dp), (bench, name, row["pass_at_1 Δ"], dp)
            assert (_mark(row["avg_time Δ"]), _mark(row["avg_time speedup"]),
                    _mark(row["pass_at_1 Δ"])) == (c_dt, c_speed, c_dp), (bench, name, row)
    names = {p.name for p in res.write(tmp_path, ["md", "csv", "json"])}
    assert {"compare.md", "compare.json", "tidy.csv", "ranking.csv", "ranking_delta.csv",
            "ranking_lists.csv"} <= names
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert len(doc["metrics"]) == sum(len(_rows(r["table"])) * 2 for r in CODE_DPO.values())


def _short(name: str) -> str:
    return name.replace("sft-25-original-data-1b-dpo-", "sft-").replace(
        "startcode1b-original-data-dpo-", "")


# The hand-written lists missed three runs that the numbers put in them (checked by hand).
HAND_OMISSIONS = {
    ("humaneval", "faster but less accurate"): {"startcode1b-original-data-sft-1"},
    ("humanevalplus", "better than baseline on every metric"): {"sft-25-original-data-1b-sft-1"},
    ("humanevalplus", "faster but less accurate"): {"sft-25-original-data-1b"},
}
# …and name one that has no humanevalplus result at all ("pvf" = startcode1b-…-dpo-pvf).
HAND_SPURIOUS = {("humanevalplus", "faster but less accurate"): {"pvf"}}


def test_ranking_lists_against_best_of_four_baseline(server):
    """The reference's lists compare with the best of four models per metric."""
    uri, _ = server
    res = _build(uri, experiment="code-dpo", view="ranking", baseline=BEST_OF_FOUR,
                 metrics="pass@1,avg_time")
    lists = res.tables["ranking_lists"]
    hand = {  # which reference list is which (the headings are in Chinese)
        "mbppplus": ["better than baseline on every metric", "faster but less accurate"],
        "mbpp": ["faster but less accurate"],
        "humaneval": ["better than baseline on every metric", "faster but less accurate"],
        "humanevalplus": ["better than baseline on every metric", "faster but less accurate"],
    }
    for bench, cats in hand.items():
        for cat, ref_list in zip(cats, CODE_DPO[bench]["lists"], strict=False):
            got = set(lists.loc[(lists["benchmark"] == bench) & (lists["category"] == cat),
                                "run"])
            extra = HAND_OMISSIONS.get((bench, cat), set())
            spurious = HAND_SPURIOUS.get((bench, cat), set())
            assert {_short(g) for g in got - extra} == set(ref_list) - spurious, (bench, cat)
    md = res.markdown()
    assert "best of sft-codedpo, sft-optimise, codedpo, optimise" in md


def test_ranking_lists_against_sft_baseline(server):
    uri, _ = server
    res = _build(uri, experiment="code-dpo", view="ranking", baseline=f"name:{BASELINE}",
                 metrics="pass@1,avg_time")
    lists = res.tables["ranking_lists"]

    def cat(bench, c):
        sel = (lists["benchmark"] == bench) & (lists["category"] == c)
        return {_short(x) for x in lists.loc[sel, "run"]}

    he = CODE_DPO["humaneval"]["lists"]
    assert cat("humaneval", "faster but less accurate") - {"startcode1b-original-data-sft-1"} \
        == set(he[2])
    assert cat("humaneval", "worse than baseline on every metric") == set(he[3])
    assert cat("humanevalplus", "better than baseline on every metric") == \
        set(CODE_DPO["humanevalplus"]["lists"][2])


def test_reference_prose_and_summary_claims(server):
    """The sentences under the "vs sft" tables and the summary (总结) at the end, checked as
    categories; where the numbers contradict the prose, the numbers win (noted inline)."""
    uri, _ = server
    sft, best4 = (_build(uri, experiment="code-dpo", view="ranking", baseline=b,
                         metrics="pass@1,avg_time") for b in (f"name:{BASELINE}", BEST_OF_FOUR))
    sft_lists, best4_lists = sft.tables["ranking_lists"], best4.tables["ranking_lists"]

    def category(lists, bench, short):
        sel = (lists["benchmark"] == bench) & (lists["run"].map(_short) == short)
        assert sel.sum() == 1, (bench, short)
        return lists.loc[sel, "category"].iloc[0]

    def members(lists, bench, cat):
        sel = (lists["benchmark"] == bench) & (lists["category"] == cat)
        return {_short(r) for r in lists.loc[sel, "run"]}

    faster = "faster but less accurate"
    slower = "more accurate but slower"
    better = "better than baseline on every metric"
    # mbpp+ vs sft: "pvf-qts, codedpo, optimise are faster than sft but pass@1 is worse"
    assert members(sft_lists, "mbppplus", faster) == {"pvf-qts", "codedpo", "optimise"}
    # "sft-pvf-qfs is worse than sft on both": it is slower (+6221.40) but more accurate (+0.0752)
    assert category(sft_lists, "mbppplus", "sft-pvf-qfs") == slower
    # mbpp vs sft: "pvf-qts, opt, optimise are faster but less accurate"; the numbers also put
    # pvf (-0.0244) and codedpo (-0.0281) there ("opt" names neither unambiguously)
    assert members(sft_lists, "mbpp", faster) == {"pvf-qts", "pvf", "codedpo", "optimise"}
    # "sft-pvf-qts is less efficient than sft" (+2391.00), while more accurate
    assert category(sft_lists, "mbpp", "sft-pvf-qts") == slower
    # summary 1: pvf-qts, pvf-qra, pvf-qsl are faster than the baseline on all four benchmarks
    # but less accurate
    for short in ("pvf-qts", "pvf-qra", "pvf-qsl"):
        for bench in CODE_DPO:
            assert category(best4_lists, bench, short) == faster, (short, bench)
    # summary 2/4: sft-pvf-qsl and sft-pvf-qra beat the baseline and sft on humaneval,
    # humaneval+ and mbpp+
    for short in ("sft-pvf-qsl", "sft-pvf-qra"):
        for bench in ("humaneval", "humanevalplus", "mbppplus"):
            assert category(best4_lists, bench, short) == better, (short, bench)
            assert category(sft_lists, bench, short) == better, (short, bench)
    # sft-qfs beats the baseline on mbpp+, humaneval, humaneval+; on mbpp it is "on par" in
    # time (0.24% slower) and more accurate
    for bench in ("mbppplus", "humaneval", "humanevalplus"):
        assert category(best4_lists, bench, "sft-qfs") == better
    assert category(best4_lists, "mbpp", "sft-qfs") == slower
    delta = best4.tables["ranking_delta"]
    row = delta[(delta["benchmark"] == "mbpp") & (delta["metric"] == "avg_time")
                & (delta["run"].map(_short) == "sft-qfs")].iloc[0]
    assert 0 < row["rel_pct"] < 0.3
    # summary 3: sft-qfs and sft-qra are less efficient than sft on humaneval+
    for short in ("sft-qfs", "sft-qra"):
        assert category(sft_lists, "humanevalplus", short) == slower
    # the "基准值" line above each delta table: the baseline's own values
    md = sft.markdown()
    for bench, ref in CODE_DPO.items():
        row = next(r for r in _rows(ref["table"]) if r[0] == BASELINE)
        section = md.split(f"### {bench} vs baseline: {BASELINE}")[1]
        line = next(ln for ln in section.splitlines() if ln.startswith("Baseline values:"))
        assert f"avg_time {row[1]}" in line and f"pass_at_1 {row[2]}" in line, (bench, line)


def test_versus_guide_workflow_with_significance(server):
    uri, ids = server
    base, cand = ids["guide"][0], ids["guide"][1]
    res = _build(uri, runs=f"{base},{cand}", view="versus")
    vs = res.tables["versus"].set_index("task")
    # the guide's example line: Base 10.50%, Finetuned 26.52%, Δ +16.02 (+152.6%)
    md = res.markdown()
    row = next(r for r in _md_tables(md)[
        "Qwen2.5-Coder-0.5B+lora-ckpt6000 vs Qwen2.5-Coder-0.5B"] if r["Task"] == "drop")
    assert (row["Baseline"], row["Candidate"], row["Δ"], row["Δ rel"]) == \
        ("10.50%", "26.52%", "+16.02 pts", "+152.6%")
    assert row["Significant"] == "yes" and "▲" in row[""]
    # preferred metrics: flexible-extract over strict-match, math_verify over exact_match
    assert vs.loc["gsm8k", "metric"] == "exact_match_flexible-extract"
    assert vs.loc["math", "metric"] == "math_verify"
    for key, (b, c, se) in GUIDE.items():
        task = key.split("/")[0]
        if vs.loc[task, "key"] != key:
            continue
        delta = c - b
        expect = None if se is None else abs(delta) >= 2 * math.sqrt(2 * se * se)
        got = vs.loc[task, "significant"]
        assert (None if got is None or got is __import__("pandas").NA else bool(got)) == \
            expect, task
    summ = res.tables["versus_summary"].iloc[0]
    assert summ["improvements"] == ["drop", "mmlu_college_physics", "mmlu_anatomy", "math",
                                    "gsm8k"]
    assert summ["regressions"] == ["mmlu_abstract_algebra", "winogrande"]
    deltas = [GUIDE[k][1] - GUIDE[k][0] for k in (
        "drop/f1", "winogrande/acc", "gsm8k/exact_match_flexible-extract",
        "math/math_verify", "mmlu_abstract_algebra/acc", "mmlu_college_physics/acc",
        "mmlu_astronomy/acc", "mmlu_anatomy/acc")]
    assert summ["avg_delta"] == pytest.approx(sum(deltas) / len(deltas) * 100)
    assert "Improvements (5 tasks)" in md and "Regressions (2 tasks)" in md
    # PPL: lower is better, so 12 → 11 is an improvement
    assert bool(vs.loc["ppl", "improved"]) is True


def test_partial_data_renders_na_without_crashing(server, tmp_path):
    uri, ids = server
    res = _build(uri, experiment="guide", baseline="Qwen2.5-Coder-0.5B", status="all")
    md = res.markdown()
    vs = res.tables["versus"]
    crashed = vs[vs["candidate"] == "crashed [FAILED]"]  # the label says it did not finish
    assert list(crashed["task"]) == ["drop"]  # only what it logged
    assert not any(c.startswith("empty") for c in set(vs["candidate"]))
    assert "N/A" in md
    assert "mean" not in set(crashed["task"])  # a mean over 1 of 8 tasks is not comparable
    assert res.write(tmp_path, "md,csv,json")


def test_unfinished_runs_are_left_out_unless_asked(server):
    uri, ids = server
    res = _build(uri, experiment="guide", baseline="Qwen2.5-Coder-0.5B", view="versus,ranking")
    in_scope = res.runset.runs[res.runset.runs["in_scope"]]
    assert set(in_scope["status"]) == {"FINISHED"} and len(in_scope) == 2
    assert res.stats["left_out"] == 2 and res.runset.left_out == {"FAILED": 2}
    assert "left out runs that did not finish (2 FAILED)" in res.markdown()
    assert not any("crashed" in str(c) for c in res.tables["ranking"].to_numpy().ravel())
    # a run named by id is compared whatever its status
    named = _build(uri, runs=f"{ids['guide'][0]},{ids['guide']['partial']}", view="versus")
    assert set(named.tables["versus"]["candidate"]) == {"crashed [FAILED]"}


def test_lineage_columns_in_tidy_table(server):
    uri, ids = server
    res = _build(uri, experiment="compress-study", view="summary", format="csv")
    tidy = res.tidy
    ft = ids["compress"][("Mistral", "best_acc")]
    rows = tidy[tidy["run_id"] == ft]
    assert set(rows["role"]) == {"best_acc"} and set(rows["family"]) == {"Mistral"}
    up = rows["upstream_run"].iloc[0]
    assert tidy.loc[tidy["run_id"] == up, "step"].iloc[0] == "evaluate"


def test_paging_requests_grow_with_pages(server):
    from mlproject.compare import CompareSpec, build

    uri, ids = server
    n = len(ids["code"])

    def run(page_size, parallel):
        return build(uri, CompareSpec(experiments=("code-dpo",), view="ranking",
                                      page_size=page_size, parallel=parallel, cache="off"))

    big, seq, par = run(1000, 1), run(7, 1), run(5, 4)
    assert big.stats["runs"] == seq.stats["runs"] == par.stats["runs"] == n
    assert seq.stats["requests"] - big.stats["requests"] == math.ceil(n / 7) - 1
    # concurrent pages: the same runs, in the same order, at most 3 empty pages extra
    pages = par.stats["requests"] - big.stats["requests"] + 1
    assert math.ceil(n / 5) <= pages <= math.ceil(n / 5) + 3
    assert list(par.runset.runs.index) == list(seq.runset.runs.index) == \
        list(big.runset.runs.index)


def test_bad_input_is_a_user_error(server):
    from mlproject.errors import UserError

    uri, ids = server
    with pytest.raises(UserError, match="baseline 'name:nope' matches no run"):
        _build(uri, experiment="code-dpo", baseline="name:nope")
    with pytest.raises(UserError, match="experiment not found: 'missing'"):
        _build(uri, experiment="missing")
    with pytest.raises(UserError, match="run not found"):
        _build(uri, runs="0123456789abcdef0123456789abcdef")
    with pytest.raises(UserError, match="invalid filter"):
        _build(uri, experiment="code-dpo", filter="metrics.x >>> 1")
    with pytest.raises(UserError, match="metric 'nope' matches no logged metric"):
        _build(uri, experiment="code-dpo", metrics="nope")


def test_role_baseline_pairs_within_family(server):
    uri, ids = server
    res = _build(uri, experiment="compress-study", view="versus", baseline="role:base")
    vs = res.tables["versus"]
    for (fam, role), rid in ids["compress"].items():
        if role == "base":
            continue
        got = set(vs.loc[vs["candidate_id"] == rid, "baseline_id"])
        assert got == {ids["compress"][(fam, "base")]}, (fam, role)
    mean = vs[(vs["candidate_id"] == ids["compress"][("Llama", "best_acc")])
              & (vs["task"] == "mean")].iloc[0]
    assert mean["baseline_value"] == pytest.approx(0.6997)


def test_lineage_runs_outside_the_filter_are_fetched(server):
    uri, ids = server
    full = _build(uri, experiment="compress-study", view="summary").tables["summary"]
    res = _build(uri, experiment="compress-study", view="summary",
                 filter="tags.`mlproject.step` = 'finetune'")
    # 4 upstream evaluate runs (Mistral*) + 4 upstream prune runs (Llama*), one search call
    assert res.stats["runs"] == 12 and res.stats["lineage_runs"] == 8
    got = res.tables["summary"].set_index(["family", "role"])
    want = full.set_index(["family", "role"])
    for fam in ("Mistral", "Mistral-Instruct", "Qwen", "Qwen-Instruct"):
        for role in ("best_acc", "best_ppl"):
            assert got.loc[(fam, role), "acc_before"] == want.loc[(fam, role), "acc_before"]
    # Llama*: the pruned-model evaluation is a sibling, not an upstream: outside the filter
    # it is not fetched, so "before" is N/A rather than wrong.
    assert math.isnan(got.loc[("Llama", "best_acc"), "acc_before"])
