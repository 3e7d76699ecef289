import sys; sys.path.insert(0, "/tmp/hunt_gen")
from h import *
arch = sys.argv[1]; dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[sys.argv[2]]
ckpt, shards = make_any(arch, 3, dtype)
r = ref(ckpt, dtype); s = streamed(ckpt, shards, dtype)
t = tok(ckpt)
enc = t(["hello world how are you doing today", "the cat", "a b c d e f"], return_tensors="pt", padding=True)
run_both(f"{arch} {sys.argv[2]} grad-on fwd", r, s, lambda m: [x.detach() for x in (lambda o: [o.logits, *o.hidden_states])(m(**enc, output_hidden_states=True))])
run_both(f"{arch} {sys.argv[2]} grad-on fwd ltk1", r, s, lambda m: m(**enc, logits_to_keep=1).logits.detach())
# generate under enable_grad? generate is no_grad-decorated. forward with cache under grad then generate
from transformers import DynamicCache
import copy
def pc(m):
    c = DynamicCache(config=m.config)
    out = m(enc.input_ids[:1], past_key_values=c)
    c = out.past_key_values
    ids = torch.cat([enc.input_ids[:1], torch.tensor([[5, 6]])], 1)
    o = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=c, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return [out.logits.detach(), o.scores]
run_both(f"{arch} {sys.argv[2]} grad-on prefix then generate", r, s, pc)
