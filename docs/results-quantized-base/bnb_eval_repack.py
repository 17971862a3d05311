import sys; sys.argv=["x","bnb","nf4"]
exec(open("exp.py").read().replace("\nmain()\n","\n"))
import bitsandbytes as bnb
for fix in (False, True):
    q=quantize("bnb","nf4")
    if fix:
        for m in q.modules():
            if isinstance(m, bnb.nn.Linear4bit): m.support_avx512bf16_for_cpu = False
    pm,lora=wrap(q); ids=batch(4,64,1)
    pm.train(); l,g=grads(pm,lora,ids) if True else None
    print("fix",fix,"train step ok, n grads", len(g))
    pm.eval()
    with torch.no_grad(): pm(input_ids=ids)   # validation pass
    pm.train(); pm.zero_grad(set_to_none=True)
    pm(input_ids=ids,labels=ids).loss.backward()
    print("fix",fix,"after eval: grads None count", sum(p.grad is None for _,p in lora), "/", len(lora))
