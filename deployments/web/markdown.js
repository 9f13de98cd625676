// A small Markdown renderer for chat replies: fenced code blocks, nested lists,
// headings, quotes, rules, paragraphs; inline code, bold, italic, strikethrough
// and http(s) links. Everything the model wrote is HTML-escaped first, so a
// reply can never inject markup or script. A fence the model has not closed
// yet (mid-stream) renders as a code block up to the end.
"use strict";

(function () {
  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(text) {
    return text.replace(/[&<>"']/g, (ch) => ESCAPES[ch]);
  }

  // Inline spans of one escaped line. Code spans are cut out first so nothing inside them is formatted.
  function inline(text) {
    const codes = [];
    let html = escapeHtml(text).replace(/`([^`]+)`/g, (_, code) => {
      codes.push(`<code>${code}</code>`);
      return `\u0000${codes.length - 1}\u0000`;
    });
    html = html
      .replace(/\*\*(?=\S)([^*]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/__(?=\S)([^_]*?\S)__/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*(?=[^\s*])([^*]*?[^\s*])\*(?![*\w])/g, "$1<em>$2</em>")
      .replace(/(^|[^_\w])_(?=[^\s_])([^_]*?[^\s_])_(?![_\w])/g, "$1<em>$2</em>")
      .replace(/~~(?=\S)([^~]*?\S)~~/g, "<del>$1</del>")
      .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g,
        '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
    return html.replace(/\u0000(\d+)\u0000/g, (_, i) => codes[Number(i)]);
  }

  const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^\s*>\s?(.*)$/;

  // Nested lists from consecutive item lines (and their indented continuation lines).
  function renderList(lines, start) {
    const stack = []; // open lists: {indent, tag}
    const out = [];
    let i = start;
    for (; i < lines.length; i++) {
      const match = ITEM.exec(lines[i]);
      if (!match) {
        const continued = lines[i].trim() && /^\s+/.test(lines[i]) && stack.length;
        if (!continued) break;
        out.push("<br>" + inline(lines[i].trim()));
        continue;
      }
      const indent = match[1].replace(/\t/g, "    ").length;
      const tag = /\d/.test(match[2]) ? "ol" : "ul";
      while (stack.length && indent < stack[stack.length - 1].indent) {
        out.push(`</li></${stack.pop().tag}>`);
      }
      const top = stack[stack.length - 1];
      if (!top || indent > top.indent) {
        const first = tag === "ol" ? parseInt(match[2], 10) : 1;
        out.push(tag === "ol" && first !== 1 ? `<ol start="${first}">` : `<${tag}>`);
        stack.push({ indent, tag });
      } else {
        out.push("</li>");
      }
      out.push("<li>" + inline(match[3]));
    }
    while (stack.length) out.push(`</li></${stack.pop().tag}>`);
    return { html: out.join(""), next: i };
  }

  function renderMarkdown(source) {
    const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let paragraph = [];
    const flush = () => {
      if (paragraph.length) out.push("<p>" + paragraph.map(inline).join("<br>") + "</p>");
      paragraph = [];
    };
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const fence = FENCE.exec(line);
      if (fence) {
        flush();
        const code = [];
        const close = new RegExp("^\\s*" + fence[1][0] + "{" + fence[1].length + ",}\\s*$");
        for (i++; i < lines.length && !close.test(lines[i]); i++) code.push(lines[i]);
        i++; // past the closing fence (or the end)
        const lang = fence[2] ? ` class="language-${escapeHtml(fence[2])}"` : "";
        out.push(`<pre><code${lang}>${escapeHtml(code.join("\n"))}</code></pre>`);
        continue;
      }
      if (!line.trim()) { flush(); i++; continue; }
      const heading = HEADING.exec(line);
      if (heading) {
        flush();
        const level = heading[1].length;
        out.push(`<h${level}>${inline(heading[2])}</h${level}>`);
        i++;
        continue;
      }
      if (RULE.test(line)) { flush(); out.push("<hr>"); i++; continue; }
      if (ITEM.test(line)) {
        flush();
        const list = renderList(lines, i);
        out.push(list.html);
        i = list.next;
        continue;
      }
      const quote = QUOTE.exec(line);
      if (quote) {
        flush();
        const quoted = [];
        for (; i < lines.length && QUOTE.test(lines[i]); i++) quoted.push(QUOTE.exec(lines[i])[1]);
        out.push(`<blockquote>${renderMarkdown(quoted.join("\n"))}</blockquote>`);
        continue;
      }
      paragraph.push(line.trim());
      i++;
    }
    flush();
    return out.join("");
  }

  window.renderMarkdown = renderMarkdown;
  window.escapeHtml = escapeHtml;
})();
