// A small Markdown renderer for agents' messages and tool descriptions, safe by construction: it
// builds DOM nodes and sets only text and a few attributes, so nothing in a message is ever parsed
// as HTML (a "<script>" in a message is shown as text). It knows what models write most:
// paragraphs, line breaks, # headings, - * + and 1. lists, > quotes, ``` fenced code, `code`,
// **bold**, *emphasis* / _emphasis_, ~~strike~~ and [links](https://…) (http, https and mailto only).

const FENCE = /^\s*(```|~~~)/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const SAFE_LINK = /^(https?:|mailto:)/i;

function node(tag, ...children) {
  const element = document.createElement(tag);
  element.append(...children);
  return element;
}

/** Render `text` as Markdown into a DocumentFragment. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i += 1; continue; }
    const fence = line.match(FENCE);
    if (fence) {
      const body = [];
      for (i += 1; i < lines.length && !lines[i].trim().startsWith(fence[1]); i += 1) body.push(lines[i]);
      i += 1; // the closing fence (or the end of the text, while it streams)
      fragment.append(node("pre", node("code", body.join("\n"))));
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      fragment.append(node(`h${Math.min(6, heading[1].length + 2)}`, ...inline(heading[2])));
      i += 1;
      continue;
    }
    if (RULE.test(line)) { fragment.append(document.createElement("hr")); i += 1; continue; }
    if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i += 1) quoted.push(lines[i].match(QUOTE)[1]);
      fragment.append(node("blockquote", renderMarkdown(quoted.join("\n"))));
      continue;
    }
    const list = BULLET.test(line) ? BULLET : NUMBERED.test(line) ? NUMBERED : null;
    if (list) {
      const element = document.createElement(list === BULLET ? "ul" : "ol");
      const first = line.match(NUMBERED);
      if (list === NUMBERED && first[1] !== "1") element.setAttribute("start", first[1]);
      for (; i < lines.length && list.test(lines[i]); i += 1) {
        const match = lines[i].match(list);
        element.append(node("li", ...inline(match[match.length - 1])));
      }
      fragment.append(element);
      continue;
    }
    const paragraph = [];
    for (; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i += 1) paragraph.push(lines[i]);
    const p = document.createElement("p");
    paragraph.forEach((part, index) => {
      if (index) p.append(document.createElement("br"));
      p.append(...inline(part));
    });
    fragment.append(p);
  }
  return fragment;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || BULLET.test(line) || NUMBERED.test(line) || QUOTE.test(line) || RULE.test(line);
}

// `code` first (nothing inside it is markup), then links, then **strong**, ~~strike~~, *em* / _em_.
const INLINE = /`([^`]+)`|\[([^\]]+)\]\(([^)\s]+)\)|\*\*(.+?)\*\*|__(.+?)__|~~(.+?)~~|\*([^*\s][^*]*?)\*|\b_([^_\s][^_]*?)_\b/;

/** The inline nodes of one line of text. */
export function inline(text) {
  const out = [];
  let rest = text;
  while (rest) {
    const match = rest.match(INLINE);
    if (!match) { out.push(rest); break; }
    if (match.index) out.push(rest.slice(0, match.index));
    const [whole, code, label, href, strong, strong2, strike, em, em2] = match;
    if (code !== undefined) out.push(node("code", code));
    else if (label !== undefined) out.push(link(label, href));
    else if (strong !== undefined || strong2 !== undefined) out.push(node("strong", ...inline(strong ?? strong2)));
    else if (strike !== undefined) out.push(node("del", ...inline(strike)));
    else out.push(node("em", ...inline(em ?? em2)));
    rest = rest.slice(match.index + whole.length);
  }
  return out;
}

function link(label, href) {
  if (!SAFE_LINK.test(href)) return `[${label}](${href})`; // javascript: and friends stay text
  const a = node("a", ...inline(label));
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  return a;
}
