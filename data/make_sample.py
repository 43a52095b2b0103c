"""Regenerate the bundled sample data: data/sample.jsonl and data/sample_unlabeled.txt.

    python data/make_sample.py

Every sentence is invented here from templates: the companies, tickers, people and figures are
fictional, so the files are free to redistribute with the project (the public data sets are not).
Deterministic: the same code always writes the same bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 2024
INSTRUCTION = "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}."
# sample.jsonl: 60 / 120 / 60 rows; the next 5 / 10 / 5 become the unlabeled predict demo.
SIZES = {"negative": (60, 5), "neutral": (120, 10), "positive": (60, 5)}

# Fictional companies: (name, ticker, sector). Sectors keep sentences plausible
# (a miner does not win a software deal).
COMPANIES = [
    ("Aldmoor Bank", "ALDB", "bank"), ("Gildenholm Bank", "GHB", "bank"),
    ("Quillstone Insurance", "QSI", "insurer"), ("Yarrow Capital", "YRC", "bank"),
    ("Redwater Mining", "RDWM", "mining"), ("Tarnby Cement", "TRNB", "construction"),
    ("Valegard Steel", "VLGS", "steel"), ("Rivenhall Steel", "RVHL", "steel"),
    ("Birchline Software", "BRCH", "software"), ("Pinecrest Software", "PNCS", "software"),
    ("Lumora Networks", "LUMN", "telecom"), ("Westfell Telecom", "WFTL", "telecom"),
    ("Pellham Retail", "PLHM", "retail"), ("Ashcombe Stores", "ASHC", "retail"),
    ("Kestrelwood Foods", "KWF", "food"), ("Calder Breweries", "CLDB", "food"),
    ("Corvel Pharma", "CRVP", "pharma"), ("Umbra Biotech", "UMBX", "pharma"),
    ("Halvard Shipping", "HLVD", "shipping"), ("Brennmark Logistics", "BMKL", "shipping"),
    ("Marisco Energy", "MRSE", "energy"), ("Northbeck Utilities", "NBU", "energy"),
    ("Nordhaven Paper", "NDHP", "paper"), ("Kallio Packaging", "KALP", "paper"),
    ("Orrin Semiconductors", "ORSC", "chips"), ("Varrick Microsystems", "VRKM", "chips"),
    ("Tamsin Motors", "TMSN", "autos"), ("Isenberg Robotics", "ISBR", "industrial"),
    ("Zephyrine Airlines", "ZPHA", "airline"), ("Harrowgate Media", "HRWG", "media"),
    ("Ottersby Games", "OTBG", "media"), ("Elstow Medical", "ELSM", "industrial"),
]
SECTORS = {  # sector: (what it sells, one of its business units, a typical customer)
    "bank": ("corporate lending", "asset management", "a regional pension fund"),
    "insurer": ("group health cover", "life insurance", "a national retail chain"),
    "mining": ("copper concentrate", "zinc", "a European smelter"),
    "construction": ("cement", "ready-mix concrete", "a motorway consortium"),
    "steel": ("steel plate", "stainless steel", "a shipyard in South Korea"),
    "software": ("cloud accounting software", "consulting", "a state tax authority"),
    "telecom": ("fibre network services", "mobile", "a hospital group"),
    "retail": ("private-label groceries", "home furnishings", "franchise partners"),
    "food": ("dairy products", "snacks", "a supermarket chain in Poland"),
    "pharma": ("a diabetes treatment", "generics", "a US distributor"),
    "shipping": ("container freight services", "port operations", "a car maker"),
    "energy": ("wind power", "gas distribution", "an aluminium smelter"),
    "paper": ("cartonboard", "pulp", "a beverage maker"),
    "chips": ("power chips", "sensors", "an electric vehicle maker"),
    "autos": ("electric vans", "spare parts", "a parcel delivery firm"),
    "industrial": ("warehouse robots", "service", "a hospital network"),
    "airline": ("charter flights", "cargo", "a tour operator"),
    "media": ("streaming subscriptions", "advertising", "a telecom operator"),
}
PEOPLE = ["Maria Lindgren", "Tomas Weber", "Anna Kowalczyk", "David Okafor", "Laura Bianchi",
          "Jussi Rantanen", "Sophie Martin", "Rahul Mehta", "Elena Petrova", "James Whitfield",
          "Ingrid Solberg", "Marco Ferreira", "Hannah Brooks", "Kenji Sato"]
PLACES = ["Tampere", "Gdansk", "Leeds", "Lyon", "Gothenburg", "Cleveland", "Monterrey", "Brno",
          "Rotterdam", "Porto", "Aarhus", "Pune", "Ghent", "Vilnius"]
REGIONS = ["the Nordic countries", "Germany", "North America", "Asia", "the Baltic states",
           "Latin America", "the UK", "central Europe"]
BROKERS = ["Halden Securities", "Morrow & Finch", "Capstan Research", "Ellery Partners", "Norvane Bank"]
PERIODS = ["the first quarter", "the second quarter", "the third quarter", "the fourth quarter",
           "the January-June period", "the first nine months", "2023", "the financial year to March"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
NEG_REASONS = ["weaker demand in Europe", "higher raw material costs", "a slump in orders",
               "delays at its main plant", "lower prices", "rising energy costs", "currency headwinds"]
POS_REASONS = ["demand stayed strong", "new products sold well", "price increases stuck",
               "cost savings took hold", "exports recovered"]
METRICS = ["net sales", "revenue", "operating profit", "net profit", "order intake", "EBITDA",
           "comparable sales"]

NEGATIVE = [
    "{co} said {metric} fell {pct}% to {cur} {amt} million in {period}, hurt by {neg_reason}.",
    "{co} swung to an operating loss of {cur} {amt} million in {period} from a profit a year earlier.",
    "{co} will cut about {n} jobs and close its site in {place}.",
    "{co} lowered its full-year guidance, citing {neg_reason}.",
    "Shares in {co} fell {pct}% after the company warned that {metric} would miss expectations.",
    "${tick} - {co} slides after {broker} downgrades to sell {url}",
    "${tick}: {broker} cuts {co} price target to ${price} from ${price2}",
    "{co} suspended its dividend to preserve cash.",
    "{co_pos} net loss widened to {cur} {amt} million in {period}.",
    "Regulators fined {co} {cur} {amt} million for breaching market disclosure rules.",
    "{co} scrapped plans to expand in {place} as demand for {product} weakened.",
    "Order intake at {co} dropped {pct}% year on year in {period}.",
    "{co} misses quarterly earnings estimates as costs climb",
    "${tick} hits 52-week low on weak sales in {region}",
    "{co} issued a profit warning on {weekday}, blaming {neg_reason}.",
    "{co} expects an impairment charge of {cur} {amt} million on its {segment} business.",
    "A strike at {co_pos} {place} site has halted operations for a second week.",
    "{co_pos} operating margin shrank to {m_low}% from {m_high}% a year earlier.",
    "{co} lost a key contract with {customer}, which accounted for about {small_pct}% of sales.",
    "{co_pos} bonds fell after {broker} warned about its rising debt.",
]
POSITIVE = [
    "{co} said {metric} rose {pct}% to {cur} {amt} million in {period}.",
    "{co} raised its full-year outlook after strong demand in {region}.",
    "{co} signed a {cur} {amt} million deal with {customer}.",
    "${tick} - {co} jumps after earnings beat estimates {url}",
    "${tick}: {broker} upgrades {co} to buy, lifts target to ${price2}",
    "{co} will raise its dividend by {pct}%.",
    "{co} returned to profit in {period}, with operating profit of {cur} {amt} million.",
    "Shares in {co} climbed {pct}% after it announced a {cur} {amt} million share buyback.",
    "{co} reported record quarterly revenue as {pos_reason}.",
    "The order backlog of {co} grew {pct}% to {cur} {amt} million.",
    "{co_pos} operating margin improved to {m_high}% from {m_low}% a year earlier.",
    "${tick} hits all-time high on strong demand for {product}",
    "{co} beat forecasts with a net profit of {cur} {amt} million for {period}.",
    "{co} will hire {n} people as it expands in {place}.",
    "{co} cut its net debt by {pct}% and lifted its cash flow target.",
    "Comparable sales at {co} rose {small_pct}% in {period}, ahead of analysts' expectations.",
    "{co} wins regulatory approval to expand its {segment} business in {region}",
    "{co} said profitability improved in all segments as {pos_reason}.",
]
NEUTRAL = [
    "{co} will publish its results for {period} on {day} {month}.",
    "{co} has appointed {person} as chief financial officer, effective {day} {month}.",
    "The annual general meeting of {co} will be held in {place} on {day} {month}.",
    "{co} employs about {n} people and sells {product} in {small_pct} countries.",
    "${tick} - {co} to present at investor conference on {month} {day} {url}",
    "{co} declares quarterly dividend of ${div} per share",
    "{co} and {co2} signed a memorandum of understanding on a joint research project.",
    "The transaction is expected to close in the second half of the year, subject to regulatory approval.",
    "{co} said it will move its head office to {place} next year.",
    "{co_pos} board proposes that the AGM authorise the repurchase of up to {n},000 own shares.",
    "{co} will hold a conference call for analysts at {hour}:00 CET.",
    "Trading in the new shares of {co} is expected to begin on {day} {month}.",
    "{co_pos} {segment} unit accounts for about {small_pct}% of group sales.",
    "{co} completed the previously announced sale of its {segment} unit to {co2}.",
    "{co} names {person} head of its operations in {region}",
    "{co} will release its {month} sales figures next week.",
    "{co_pos} share capital totals {cur} {amt} million after the registration of the new shares.",
    "{co} reiterated its guidance for the full year.",
    "Analysts expect {co} to report {metric} of {cur} {amt} million for {period}.",
    "{co} will merge two of its subsidiaries into a single company from {day} {month}.",
    "{co} signed a framework agreement with {customer}; financial terms were not disclosed.",
    "{person} will continue as chair of {co_pos} board.",
    "Stocks to watch: ${tick}, ${tick2}",
    "{co} is holding its capital markets day in {place} on {day} {month}.",
    "{co} schedules earnings release and webcast for {month} {day}",
    "{co_pos} shares were unchanged at {cur} {price} in early trading.",
    "{co_pos} shares trade under the ticker {tick}.",
    "{co} published its annual sustainability report on {weekday}.",
]


def slots(rng: random.Random) -> dict:
    """Fresh values for every placeholder; str.format ignores the ones a template doesn't use."""
    (co, tick, sector), (co2, tick2, _) = rng.sample(COMPANIES, 2)
    product, segment, customer = SECTORS[sector]
    m_low = rng.randint(2, 9)
    price = rng.randint(12, 180)
    return {
        "co": co, "co_pos": co + ("'" if co.endswith("s") else "'s"), "tick": tick, "co2": co2, "tick2": tick2, "product": product, "segment": segment,
        "customer": customer, "person": rng.choice(PEOPLE), "place": rng.choice(PLACES),
        "region": rng.choice(REGIONS), "broker": rng.choice(BROKERS), "period": rng.choice(PERIODS),
        "metric": rng.choice(METRICS), "neg_reason": rng.choice(NEG_REASONS),
        "pos_reason": rng.choice(POS_REASONS), "cur": rng.choice(["EUR", "EUR", "USD", "SEK", "GBP"]),
        "amt": rng.choice([f"{rng.uniform(1, 99):.1f}", str(rng.randint(100, 950))]),
        "pct": rng.randint(4, 38), "small_pct": rng.randint(3, 45), "n": rng.randint(3, 90) * 10,
        "m_low": m_low, "m_high": m_low + rng.randint(2, 6), "price": price,
        "price2": price + rng.randint(3, 40), "div": f"0.{rng.randint(5, 95):02d}",
        "day": rng.randint(1, 28), "month": rng.choice(MONTHS), "hour": rng.randint(9, 16),
        "weekday": rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]),
        "url": "https://example.com/n/" + "".join(rng.choices("abcdefghjkmnpqrstuvwxyz23456789", k=8)),
    }


def sentences(templates: list[str], count: int, rng: random.Random, seen: set[str]) -> list[str]:
    """`count` distinct sentences; templates are taken round-robin so each is used about equally."""
    out: list[str] = []
    order = templates[:]
    while len(out) < count:
        rng.shuffle(order)
        for template in order:
            text = template.format(**slots(rng))
            if text not in seen and len(out) < count:
                seen.add(text)
                out.append(text)
    return out


def main() -> None:
    rng = random.Random(SEED)
    seen: set[str] = set()
    labelled, unlabelled = [], []
    for label, templates in (("negative", NEGATIVE), ("neutral", NEUTRAL), ("positive", POSITIVE)):
        n_sample, n_extra = SIZES[label]
        texts = sentences(templates, n_sample + n_extra, rng, seen)
        labelled += [(text, label) for text in texts[:n_sample]]
        unlabelled += texts[n_sample:]
    rng.shuffle(labelled)
    rng.shuffle(unlabelled)
    with open(HERE / "sample.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for text, label in labelled:
            f.write(json.dumps({"instruction": INSTRUCTION, "input": text, "output": label}) + "\n")
    with open(HERE / "sample_unlabeled.txt", "w", encoding="utf-8", newline="\n") as f:
        f.writelines(text + "\n" for text in unlabelled)
    print(f"wrote {len(labelled)} rows to {HERE / 'sample.jsonl'} and "
          f"{len(unlabelled)} lines to {HERE / 'sample_unlabeled.txt'}")


if __name__ == "__main__":
    main()
