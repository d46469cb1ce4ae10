// The gateway's split between the champion and a challenger (njs; the chart's _canary.tpl wires it in).
//
// The gateway agent (python -m shared.serve.agent --role gateway) keeps the routes file current:
//   {"model", "champion", "challenger", "weight", "sticky", "previous", "salt"}
// It is read on every request, so a weight change or a promotion applies from the next request
// on, without a reload.
//
// pick()      which version answers: sha256(salt, sticky key) puts each client in one of 100
//             buckets; buckets below the weight go to the challenger. The key is the API key (or,
//             with sticky "conversation", the X-Lawtune-Conversation header when sent; a page call,
//             which carries no key, the user or address the gateway sets), so a
//             client stays on one side while the weight stands, and raising the weight only
//             moves clients from the champion to the challenger.
// body()      rewrites a request for `<model>` (or one that names no model) to `<model>:<version>`,
//             the name the version is served under, so vLLM answers with it in `model`; a request
//             that names `<model>:<version>` itself is passed on as it is (pinned).
// fallbackBody()  when the replica that got the request answers 404 (it has not loaded that
//             version yet, e.g. seconds after a promotion), the same request goes to the version
//             before: the champion for the challenger's share, the previous champion for the
//             champion's. Used only for versions the gateway chose.
// Written for njs 0.7 (Debian bookworm) and later (the official nginx image).
import fs from 'fs';
import crypto from 'crypto';

function routes(r) {
    try {
        return JSON.parse(fs.readFileSync(r.variables.lawtune_routes_file));
    } catch (e) {
        r.warn('lawtune canary: no routes (' + e.message + '): requests pass unchanged');
        return null;
    }
}

function stickyKey(r, rt) {
    const conversation = r.headersIn['X-Lawtune-Conversation'];
    if (rt.sticky === 'conversation' && conversation) {
        return 'c:' + conversation;
    }
    // Page calls (no key of their own): the user the ingress names, else the client's address.
    return 'k:' + (r.headersIn['Authorization'] || r.variables.lawtune_client_id || r.remoteAddress);
}

function bucket(salt, key) {
    const digest = crypto.createHash('sha256').update(salt + '\n' + key).digest('hex');
    return parseInt(digest.slice(0, 8), 16) % 100;
}

function pick(r) {
    const rt = routes(r);
    if (!rt || !rt.champion) {
        r.variables.lawtune_arm = 'none';
        return '';
    }
    r.variables.lawtune_model = rt.model;
    let version = rt.champion;
    let arm = 'champion';
    if (rt.challenger && rt.weight > 0 && bucket(rt.salt || '', stickyKey(r, rt)) < rt.weight) {
        version = rt.challenger;
        arm = 'challenger';
    }
    r.variables.lawtune_arm = arm;
    r.variables.lawtune_fallback_version = arm === 'challenger' ? rt.champion : (rt.previous || '');
    return version;
}

function parse(r) {
    const text = r.requestText;
    if (!text) {
        return null;
    }
    try {
        const doc = JSON.parse(text);
        return doc && typeof doc === 'object' && !Array.isArray(doc) ? doc : null;
    } catch (e) {
        return null;  // vLLM answers malformed JSON with its own 400
    }
}

function body(r) {
    const model = r.variables.lawtune_model;
    const version = r.variables.lawtune_version;
    const doc = parse(r);
    if (doc === null || !model) {
        r.variables.lawtune_arm = 'other';
        return r.requestText || '';
    }
    if (version && (doc.model === undefined || doc.model === model)) {
        doc.model = model + ':' + version;
        r.variables.lawtune_served = version;
        return JSON.stringify(doc);
    }
    if (typeof doc.model === 'string' && doc.model.indexOf(model + ':') === 0) {
        r.variables.lawtune_arm = 'pinned';
        r.variables.lawtune_served = doc.model.slice(model.length + 1);
    } else {
        r.variables.lawtune_arm = 'other';
    }
    return r.requestText;
}

function fallbackBody(r) {
    const doc = parse(r);
    const fallback = r.variables.lawtune_fallback_version;
    doc.model = r.variables.lawtune_model + ':' + fallback;
    r.variables.lawtune_served = fallback;
    r.variables.lawtune_arm = 'fallback';
    return JSON.stringify(doc);
}

export default {pick, body, fallbackBody};
