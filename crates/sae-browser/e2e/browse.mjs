// Drives the feature browser in headless Chromium: list -> search -> latent page -> text box.
// Usage: node browse.mjs URL OUT_DIR   (exit 0 = all checks passed; screenshots in OUT_DIR)
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, out] = process.argv.slice(2);
if (!url || !out) {
  console.error("usage: node browse.mjs URL OUT_DIR");
  process.exit(2);
}
const executablePath = process.env.SAE_CHROMIUM || "/usr/bin/chromium";
const profile = mkdtempSync(join(tmpdir(), "sae-browser-profile-"));
const problems = [];
const check = (ok, what) => {
  if (!ok) problems.push(what);
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
};

const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  viewport: { width: 1280, height: 900 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(15000);
  const origin = new URL(url).origin;
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  page.on("console", (m) => { if (m.type() === "error") problems.push("console error: " + m.text()); });
  page.on("request", (r) => {
    if (!r.url().startsWith(origin) && !r.url().startsWith("data:")) problems.push("request outside the server: " + r.url());
  });

  // 1. The list.
  await page.goto(url + "/");
  await page.waitForSelector("#latent-table tbody tr");
  const nRows = await page.locator("#latent-table tbody tr").count();
  check(nRows > 10, `list shows latents (${nRows} rows)`);
  const freqs = await page.locator("#latent-table tbody tr td:nth-child(2)").allTextContents();
  check(freqs.length === nRows && freqs[0] !== "0", "first row has the highest frequency");
  await page.screenshot({ path: join(out, "list.png"), fullPage: true });

  // Sort by max activation through the column header, then search by token.
  await page.click("#latent-table th:nth-child(3)");
  await page.waitForFunction(() => location.hash.includes("sort=max"));
  await page.waitForSelector("#latent-table th.sorted:nth-child(3)");
  await page.fill("#search", "ball");
  await page.waitForFunction(() => location.hash.includes("q=ball"));
  await page.waitForFunction(() => {
    const rows = document.querySelectorAll("#latent-table tbody tr");
    return rows.length > 0 && [...rows].every((r) => r.textContent.includes("ball"));
  });
  const found = await page.locator("#latent-table tbody tr").count();
  check(found > 0 && found < nRows, `search "ball" narrows the list (${found} rows)`);
  await page.screenshot({ path: join(out, "search.png"), fullPage: true });

  // 2. A latent page, from the list.
  await page.locator("#latent-table tbody tr a").first().click();
  await page.waitForSelector("#top-examples .tok.center");
  const title = await page.textContent("#latent-title");
  check(/^Latent #\d+$/.test(title), `latent page title "${title}"`);
  const hl = await page.locator("#top-examples .tok.hl").count();
  check(hl > 0, `top contexts have highlighted tokens (${hl})`);
  const centers = await page.locator("#top-examples .tok.center").allTextContents();
  check(centers.length > 0 && centers.every((t) => t.length > 0), `each example marks its token (${centers.length})`);
  check(await page.locator("#hist-card svg rect.bar").count() > 0, "activation histogram drawn");
  check(await page.locator("#logits-card table.logits tr").count() > 0, "logit effects listed");
  await page.screenshot({ path: join(out, "latent.png"), fullPage: true });

  // 3. The text box.
  await page.goto(url + "/#/text");
  await page.waitForSelector("#text-in");
  await page.fill("#text-in", "the big dog ran to the park with a red ball");
  await page.click("#encode");
  await page.waitForFunction(() => document.querySelector("#text-tokens")?.textContent.includes("ball"));
  await page.waitForSelector("#text-tokens .tok.hl");
  const toks = await page.locator("#text-tokens .tok").count();
  const lit = await page.locator("#text-tokens .tok.hl").count();
  check(toks === 12 && lit > 0, `text tokenized (${toks} tokens) with highlighted tokens (${lit})`);
  const fired = await page.locator("#fired tbody tr").count();
  check(fired > 0, `latents that fired are listed (${fired})`);
  // Picking another latent re-highlights the text.
  await page.locator("#fired tbody tr").nth(1).click();
  await page.waitForSelector("#fired tbody tr.sel");
  await page.locator("#text-tokens .tok").nth(3).click();
  await page.waitForSelector("#token-info .chip");
  await page.screenshot({ path: join(out, "text.png"), fullPage: true });

  // 4. Bad input in the page: an unknown latent shows an error, the page survives.
  await page.goto(url + "/#/latent/99999999");
  await page.waitForSelector(".error");
  check((await page.textContent(".error")).includes("unknown latent"), "unknown latent shows an error");
  await page.goto(url + "/#/text");
  await page.fill("#text-in", "cat ".repeat(3000));
  await page.click("#encode");
  await page.waitForSelector("#text-result .error");
  check((await page.textContent("#text-result .error")).includes("too long"), "huge text gets a clear error");
} catch (e) {
  problems.push("step failed: " + (e && e.message ? e.message.split("\n")[0] : e));
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
// The 404s above are expected answers, logged by Chromium as console errors.
const real = problems.filter((p) => !/Failed to load resource: the server responded with a status of (404|413)/.test(p));
if (real.length) {
  console.error("browser test failed:\n  " + real.join("\n  "));
  process.exit(1);
}
console.log("browser test passed");
