"""
Reading answers out of a GPT with a KV cache (paper Sec 4.2: generation, and ranking a catalogue):
- generate: greedy or sampled continuation (review generation);
- beam_search: batched, ranked by summed log-probability, constrained by `allowed` (eval.py: the
  catalogue);
- answer_logprobs: the summed log-probability of every candidate answer after each prompt, exactly,
  in memory that does not grow with the catalogue. It is the fast form of eval.title_logprobs
  (tested equal): the prompt runs once, then the candidates' prefix trie is scored through its KV
  cache, a chunk at a time (tree_logits), so a prefix that titles share is computed once.

Call gpt.eval() first: dropout would make cached and uncached passes differ.

Dimension letters: B batch, P prompt tokens, T tree tokens, L cached positions, V vocabulary, K
beams, C candidate answers, n answers of a chunk, S the longest of them.
"""
import heapq
from collections import namedtuple

import torch
import torch.nn.functional as F

from model import KVCache, LayerKV


def reorder(cache, rows):
    """Keep or duplicate the batch rows of a KVCache (beam search): every cached tensor becomes
    tensor[rows]."""
    for layer in cache.layers:
        layer.k, layer.v = layer.k[rows], layer.v[rows]
    if cache.xattn_kv is not None:
        cache.xattn_kv = {i: (k[rows], v[rows]) for i, (k, v) in cache.xattn_kv.items()}
    if cache.user_mask is not None:
        cache.user_mask = cache.user_mask[rows]
    cache.key_mask, cache.n_real = cache.key_mask[rows], cache.n_real[rows]


@torch.no_grad()
def generate(gpt, idx, max_new_tokens, user=None, user_mask=None, prefix=None, prefix_mask=None,
             temperature=0.0, top_k=None, eos=None):
    """Continue the prompts idx (B, T) by up to max_new_tokens tokens with a KV cache: greedy when
    temperature is 0, else sampling (optionally from the top_k). Returns (B, T + n); a row that
    emitted eos is filled with eos after it, and generation stops once every row has."""
    cache = KVCache(gpt.config.n_layer)
    logits, _ = gpt(idx, user=user, user_mask=user_mask, prefix=prefix, prefix_mask=prefix_mask,
                    cache=cache)
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        logits = logits[:, -1, :]  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(-1)  # (B,)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                logits = logits.masked_fill(logits < kth, -float("inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)[:, 0]  # (B,)
        if eos is not None:
            nxt = torch.where(done, eos, nxt)
            done = done | (nxt == eos)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if step == max_new_tokens - 1 or (eos is not None and done.all()):
            break
        logits, _ = gpt(nxt[:, None], cache=cache)
    return idx


@torch.no_grad()
def beam_search(gpt, idx, beam_size, max_new_tokens, user=None, user_mask=None, prefix=None,
                prefix_mask=None, eos=None, allowed=None):
    """Batched beam search ranked by summed log-probability (no length normalisation), with a KV
    cache. idx (B, T): prompts of equal length (the task prompts are fixed-length; user or prefix
    padding goes in the masks). allowed(rows) -> for each row (the generated-so-far tokens of a live
    beam) the token ids allowed next (None, for the whole answer or one row: unconstrained); eval.py
    plugs a catalogue prefix trie in here. Every step, each live beam ending with eos is a finished
    candidate, and its best K non-eos continuations become the next beams; a prompt stops once its K
    best finished hypotheses all outscore its best live beam (log-probs are <= 0, so no live beam
    can overtake them). Returns per prompt a list of (tokens, sum_logprob), best first, beam_size
    long where possible: live beams cut at max_new_tokens compete with the finished."""
    B, K = idx.size(0), beam_size
    dev, NEG = idx.device, -float("inf")
    cache = KVCache(gpt.config.n_layer)
    logits, _ = gpt(idx, user=user, user_mask=user_mask, prefix=prefix, prefix_mask=prefix_mask,
                    cache=cache)
    reorder(cache, torch.arange(B, device=dev).repeat_interleave(K))  # (B*K): K beams per prompt
    logits = logits[:, -1].repeat_interleave(K, dim=0)  # (B*K, V)
    scores = [0.0 if k == 0 else NEG for _ in range(B) for k in range(K)]  # one live beam at first
    seqs = [[] for _ in range(B * K)]
    finished, done = [[] for _ in range(B)], [False] * B
    for step in range(max_new_tokens):
        logp = F.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        if allowed is not None:
            logp = logp + allowed_bias(allowed, seqs, scores, logp)
        if eos is not None:  # ending a beam: a finished candidate; continuing it competes for the K
            ends = (torch.tensor(scores, device=dev) + logp[:, eos]).tolist()  # (B*K)
            logp[:, eos] = NEG
        V = logp.size(1)
        cand = (torch.tensor(scores, device=dev)[:, None] + logp).view(B, K * V)  # (B, K*V)
        top, ids = (t.tolist() for t in cand.topk(K, dim=1))  # (B, K)
        rows, toks, scores = [], [], []
        for b in range(B):
            live = []
            if not done[b]:
                if eos is not None:
                    finished[b] += [(seqs[r] + [eos], ends[r]) for r in range(b * K, b * K + K)
                                    if ends[r] > NEG]
                    finished[b] = sorted(finished[b], key=lambda h: -h[1])[:K]
                live = [(b * K + i // V, i % V, s) for s, i in zip(top[b], ids[b]) if s > NEG]
                if not live or (len(finished[b]) == K and finished[b][-1][1] >= live[0][2]):
                    done[b], live = True, []
            live += [(b * K, 0, NEG)] * (K - len(live))  # dead placeholders keep the shape (B*K)
            for beam, t, s in live:
                rows.append(beam), toks.append(t), scores.append(s)
        seqs = [seqs[r] + [t] for r, t in zip(rows, toks)]
        if all(done) or step == max_new_tokens - 1:
            break
        reorder(cache, torch.tensor(rows, device=dev))
        logits, _ = gpt(torch.tensor(toks, device=dev)[:, None], cache=cache)
        logits = logits[:, -1]  # (B*K, V)
    out = []
    for b in range(B):
        pool = finished[b] + [(seqs[r], scores[r]) for r in range(b * K, b * K + K)
                              if not done[b] and scores[r] > NEG]
        out.append(sorted(pool, key=lambda h: -h[1])[:K])
    return out


def allowed_bias(allowed, seqs, scores, logp):
    """(B*K, V) additive mask: 0 where allowed(...) permits the next token of a live beam, -inf
    elsewhere."""
    bias = torch.zeros_like(logp)
    live = [r for r, s in enumerate(scores) if s > -float("inf")]
    spec = allowed([seqs[r] for r in live])
    if spec is None:
        return bias
    rows, cols = [], []
    for r, ids in zip(live, spec):
        if ids is not None:
            bias[r] = -float("inf")
            rows += [r] * len(ids)
            cols += list(ids)
    index = torch.tensor([rows, cols], dtype=torch.long, device=logp.device)  # (2, n)
    bias[index[0], index[1]] = 0.0
    return bias


def tree_ancestors(parent):
    """parent (T,) long (-1: a root) -> (T, T) bool, [t, s] = s is t or an ancestor of t. One step
    up the tree per iteration for all tokens at once (as many iterations as the tree is deep)."""
    T = parent.numel()
    rows = torch.arange(T, device=parent.device)
    up = torch.cat([torch.where(parent >= 0, parent, T), rows.new_tensor([T])])  # (T + 1,)
    anc = torch.zeros(T, T + 1, dtype=torch.bool, device=parent.device)
    node = rows
    for _ in range(T + 1):  # a token is at most T - 1 steps below its root
        anc[rows, node] = True
        if bool((node == T).all()):
            break
        node = up[node]
    return anc[:, :T]


@torch.no_grad()
def tree_logits(gpt, idx, parent, cache):
    """Logits of a token tree that continues every cached sequence, leaving the cache as it was: one
    prompt's cache serves many trees. idx (B, T): the tree's tokens, the same tree for every row;
    parent (T,) long: each token's parent, an earlier index, or -1 for a token right after the
    cached sequence. Token t attends to the cached real positions, its ancestors and itself, at
    position n_real + its depth, so its logits are those of one plain forward over [cached
    sequence][the path from its root to t]. Returns (B, T, V)."""
    B, T = idx.shape
    anc = tree_ancestors(parent)  # (T, T)
    depth = anc.sum(1) - 1  # (T,): 0 right after the cache
    L, S = cache.key_mask.size(1), int(depth.max()) + 1  # the longest path: S positions after L
    if L + S > gpt.config.block_size:
        raise ValueError(f"sequence of {L + S} positions exceeds "
                         f"block_size={gpt.config.block_size}")
    mask = torch.cat([cache.key_mask[:, None, :].expand(B, T, L), anc.expand(B, T, T)], dim=2)
    pos = cache.n_real[:, None] + depth  # (B, T)
    x = gpt.transformer.drop(gpt.transformer.wte(idx) + gpt.transformer.wpe(pos))
    forks = [LayerKV(layer.k, layer.v) for layer in cache.layers]  # the tree's k/v are not kept
    x = gpt.blocks(x, mask, cache.xattn_kv or {}, cache.user_mask, forks)
    return gpt.lm_head(gpt.transformer.ln_f(x))  # (B, T, V)


class Trie:
    """Prefix trie over the catalogue's answers (token lists ending with eot, unique:
    data.unique_names). Plugged into beam_search as `allowed`, it keeps every hypothesis a real
    catalogue entry."""

    def __init__(self, answers):
        self.root, self.ids = {}, {}
        for i, seq in enumerate(answers):
            if i == 0:
                continue  # padding is no answer
            node = self.root
            for t in seq:
                node = node.setdefault(t, {})
            self.ids[tuple(seq)] = i

    def allowed(self, rows):
        """For each generated-so-far token list, the tokens that continue it to a catalogue
        entry."""
        out = []
        for row in rows:
            node = self.root
            for t in row:
                node = node[t]
            out.append(list(node))
        return out


TREE_NODES = 128  # trie nodes per tree_logits call in answer_logprobs: at most B x this many tokens
TrieChunk = namedtuple("TrieChunk", "tokens parent ids pred target")


def trie_chunks(answers, max_nodes=TREE_NODES):
    """Split the prefix trie of the answers (token lists) into sub-tries of whole answers and at
    most max_nodes internal nodes each (more only for one answer longer than that). The answers go
    in sorted order, so neighbours share their prefixes and a chunk holds each shared prefix once; a
    prefix split between two chunks is held by both (a few % more tokens). The internal nodes are
    the answers' proper prefixes: the last token of an answer is only predicted, never fed."""
    order = sorted(range(len(answers)), key=lambda c: list(answers[c]))
    chunks, group, nodes = [], [], {}  # nodes: the chunk's internal nodes, prefix -> index
    for c in order:
        prefixes = [tuple(answers[c][:i]) for i in range(1, len(answers[c]))]
        if group and len(nodes) + sum(p not in nodes for p in prefixes) > max_nodes:
            chunks.append(trie_chunk(answers, group, nodes))
            group, nodes = [], {}
        group.append(c)
        for p in prefixes:
            nodes.setdefault(p, len(nodes))
    return chunks + [trie_chunk(answers, group, nodes)] if group else chunks


def trie_chunk(answers, group, nodes):
    """One sub-trie: tokens (T,) and parent (T,) of its internal nodes (-1: right after the prompt),
    as tree_logits takes them; ids (n,) of its answers; and for each answer token, (n, S) padded:
    pred, the position whose logits predict it (0: the prompt's last token, j + 1: node j), and
    target, the token (-1: padding)."""
    tokens = torch.tensor([p[-1] for p in nodes], dtype=torch.long)
    parent = torch.tensor([nodes.get(p[:-1], -1) for p in nodes], dtype=torch.long)
    S = max(len(answers[c]) for c in group)
    pred = torch.zeros(len(group), S, dtype=torch.long)
    target = torch.full((len(group), S), -1, dtype=torch.long)
    for r, c in enumerate(group):
        a = list(answers[c])
        pred[r, :len(a)] = torch.tensor([0] + [1 + nodes[tuple(a[:i])] for i in range(1, len(a))])
        target[r, :len(a)] = torch.tensor(a)
    return TrieChunk(tokens, parent, torch.tensor(group, dtype=torch.long), pred, target)


@torch.no_grad()
def answer_logprobs(llm, idx, context, answers, chunks=None):
    """Summed log-probability of every candidate answer after each prompt: idx (B, P) -> (B, C),
    exact. The prompt runs once with its user context; its KV cache then serves every chunk of the
    answers' prefix trie (trie_chunks(answers); pass them as chunks to score the same answers many
    times), one tree_logits call each. Memory, whatever C: a call feeds B x T tokens, T <=
    max(TREE_NODES, the longest answer); its largest tensors are the (B, T, V) logits and
    log-probabilities and the attention's (B, nh, T, P + T) scores."""
    B, dev = idx.size(0), idx.device
    cache = KVCache(llm.config.n_layer)
    logits, _ = llm(idx, cache=cache, **context)
    first = torch.log_softmax(logits[:, -1:].float(), dim=-1)  # (B, 1, V): answers' first tokens
    scores = torch.empty(B, len(answers), device=dev)
    for ch in trie_chunks(answers) if chunks is None else chunks:
        logp = first
        if len(ch.tokens):
            tree = ch.tokens.to(dev).expand(B, -1)  # (B, T)
            logits = tree_logits(llm, tree, ch.parent.to(dev), cache)  # (B, T, V)
            logp = torch.cat([first, torch.log_softmax(logits.float(), dim=-1)], dim=1)
        pred, target = ch.pred.to(dev), ch.target.to(dev)
        picked = logp[:, pred, target.clamp(min=0)]  # (B, n, S): each answer token's log-prob
        scores[:, ch.ids.to(dev)] = torch.where(target >= 0, picked, 0.0).sum(2)
    return scores



@torch.no_grad()
def top_answers(llm, idx, context, answers, k=10, max_rows=256):
    """The k likeliest candidate answers after each prompt idx (B, P), exactly: per prompt a list of
    (answer index, summed log-probability), best first, with every answer that ties the k-th. Equal
    to the top of answer_logprobs (tested), at a fraction of its cost: a best-first search over the
    answers' prefix trie. Every token's log-probability is <= 0, so a prefix's log-probability
    bounds every answer below it; prefixes are expanded in order of their log-probability, up to
    max_rows a call over all prompts, and a prompt is done once k whole answers outscore every
    prefix left. Each call feeds one token per expanded prefix through a KVCache holding its
    prompt's keys and values and its path's (kept in a pool, one row per expanded prefix)."""
    B, dev = idx.size(0), idx.device
    cache = KVCache(llm.config.n_layer)
    logits, _ = llm(idx, cache=cache, **context)
    children, answer_of = answer_trie(answers)
    heaps, done = [[] for _ in range(B)], [[] for _ in range(B)]
    logp = torch.log_softmax(logits[:, -1].float(), dim=-1).tolist()  # (B, V)
    for b in range(B):  # (-log-probability, node, pool row of its parent, depth)
        heaps[b] = [(-logp[b][t], c, -1, 1) for t, c in children[0].items()]
        heapq.heapify(heaps[b])
    pool = PrefixPool(cache, max(map(len, answers)))
    tokens_of = {c: t for n in children for t, c in n.items()}
    while True:
        todo = [b for b in range(B) if heaps[b] and not finished(done[b], heaps[b], k)]
        if not todo:
            break
        rows = []  # (prompt, node, score, parent's pool row, depth) of the prefixes fed this call
        share = max(1, max_rows // len(todo))  # prefixes each prompt may expand this call
        for b in todo:
            fed = 0
            while heaps[b] and fed < share and not finished(done[b], heaps[b], k):
                score, node, parent, depth = heapq.heappop(heaps[b])
                if node in answer_of:  # a whole answer (its last token is end-of-text)
                    done[b].append((answer_of[node], -score))
                else:
                    rows.append((b, node, -score, parent, depth))
                    fed += 1
        if not rows:
            continue
        prompts, _, _, parents, depths = (torch.tensor(x, device=dev) for x in zip(*rows))
        cache_rows, new_rows = pool.cache(prompts, parents, depths)
        tokens = torch.tensor([[tokens_of[r[1]]] for r in rows], device=dev)  # (n, 1)
        logits, _ = llm(tokens, cache=cache_rows)
        pool.keep(cache_rows, new_rows)
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1).tolist()  # (n, V)
        for (b, node, score, _, depth), lp, row in zip(rows, logp, new_rows.tolist()):
            for t, c in children[node].items():
                heapq.heappush(heaps[b], (-(score + lp[t]), c, row, depth + 1))
    return [sorted(d, key=lambda a: -a[1]) for d in done]


def finished(done, heap, k):
    """Whether k whole answers are found and the best prefix left cannot reach the k-th of them."""
    if len(done) < k:
        return False
    kth = sorted((s for _, s in done), reverse=True)[k - 1]
    return -heap[0][0] < kth


def answer_trie(answers):
    """The prefix trie of the answers (token lists, each ended by end-of-text): children[node]
    {token: child}, node 0 the root; answer_of {leaf: answer index}."""
    children, answer_of = [{}], {}
    for i, answer in enumerate(answers):
        node = 0
        for t in answer:
            if t not in children[node]:
                children[node][t] = len(children)
                children.append({})
            node = children[node][t]
        answer_of[node] = i
    return children, answer_of


class PrefixPool:
    """What top_answers keeps of the prefixes it expanded: the keys and values of each one's last
    token, per layer, and its path (the pool rows of its tokens), so that a prefix's KVCache is its
    prompt's followed by its path's."""

    def __init__(self, prompt_cache, max_depth, rows=1024):
        self.prompt, self.n = prompt_cache, 0
        self.k = [layer.k.new_empty(rows, layer.k.size(-1)) for layer in prompt_cache.layers]
        self.v = [layer.v.new_empty(rows, layer.v.size(-1)) for layer in prompt_cache.layers]
        self.path = torch.full((rows, max_depth), -1, dtype=torch.long, device=self.k[0].device)

    def cache(self, prompts, parents, depths):
        """A KVCache for prefixes to feed (n,): the prompt rows `prompts` followed by the path of
        each one's parent (pool rows `parents`, -1 for none; `depths` its tokens); and the pool rows
        their own keys and values will take."""
        D = int(depths.max()) - 1  # the longest parent path
        anc = torch.where(parents[:, None] >= 0, self.path[parents.clamp(min=0), :D], -1)  # (n, D)
        c, rows = KVCache(len(self.k)), anc.clamp(min=0)
        for layer, prompt, pk, pv in zip(c.layers, self.prompt.layers, self.k, self.v):
            layer.k = torch.cat([prompt.k[prompts], pk[rows]], dim=1)  # (n, L + D, C)
            layer.v = torch.cat([prompt.v[prompts], pv[rows]], dim=1)
        c.key_mask = torch.cat([self.prompt.key_mask[prompts], anc >= 0], dim=1)  # (n, L + D)
        c.n_real = c.key_mask.sum(1)
        if self.prompt.xattn_kv is not None:
            c.xattn_kv = {i: (k[prompts], v[prompts]) for i, (k, v) in self.prompt.xattn_kv.items()}
            c.user_mask = None if self.prompt.user_mask is None else self.prompt.user_mask[prompts]
        new = torch.arange(self.n, self.n + len(prompts), device=anc.device)
        self.grow(self.n + len(prompts))
        self.path[new, :D] = anc
        self.path[new, depths - 1] = new
        return c, new

    def keep(self, cache, rows):
        """Store the keys and values that the last call appended to cache, at the pool rows rows."""
        for layer, pk, pv in zip(cache.layers, self.k, self.v):
            pk[rows], pv[rows] = layer.k[:, -1], layer.v[:, -1]
        self.n = int(rows.max()) + 1

    def grow(self, n):
        while n > len(self.path):  # double the buffers
            self.k = [torch.cat([t, torch.empty_like(t)]) for t in self.k]
            self.v = [torch.cat([t, torch.empty_like(t)]) for t in self.v]
            self.path = torch.cat([self.path, torch.full_like(self.path, -1)])
