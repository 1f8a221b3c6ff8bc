"""Profile one QAT training step (top ops by self CPU time). python prof.py METHOD [bf16|fp32] [model]"""
import sys, copy, torch, torch.nn.functional as F
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2])); sys.path.insert(0, str(Path(__file__).resolve().parent))
from nets import build
import qtrainer
torch.set_num_threads(1)
method = sys.argv[1]; dt = sys.argv[2] if len(sys.argv) > 2 else "bf16"
name = sys.argv[3] if len(sys.argv) > 3 else "resnet9"
m = build(name, width=16) if name == "resnet9" else build(name)
x = torch.randn(128, 3, 32, 32); y = torch.randint(0, 10, (128,))
if method != "fp":
    mk = {"noise": "uniform"} if method == "nipq-uniform" else {}
    qtrainer.quantize_model(m, method=method.split("-")[0], weight_bits=4, act_bits=4, first_last_bits=8, method_kwargs=mk, example_input=x[:8])
    qtrainer.initialize_quantizers(m, x)
m = m.to(memory_format=torch.channels_last)
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == "bf16"):
        loss = F.cross_entropy(m(x.contiguous(memory_format=torch.channels_last)).float(), y)
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(3): step()
from torch.profiler import profile
with profile() as p:
    for _ in range(3): step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))
