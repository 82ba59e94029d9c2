"""Generate lorakit's demo dataset: support questions about Tidewren, a fictional SaaS company.

Every fact (prices, hours, menu paths, limits, addresses) is invented, so the base model cannot know
them and an adapter that answers them correctly has learned them from this data.

Each intent has one canonical answer, its key facts (exact substrings of the answer, used to score
accuracy), a few hand-written train phrasings and a few held-out eval phrasings. Queries are those
phrasings wrapped in greetings and thanks, picked with a seeded `random.Random`, so the output is
byte-identical on every run. Eval queries come only from the held-out phrasings: the eval measures
whether the adapter generalises to new wordings, not whether it memorised a near-duplicate.

    python scripts/make_demo_data.py           # write src/lorakit/demo_data/{train,eval}.jsonl
    python scripts/make_demo_data.py --check   # exit 1 if the shipped files differ from a regeneration
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from lorakit.io_utils import atomic_write

SEED = 20240503
TRAIN_PER_INTENT = 35
EVAL_PER_INTENT = 5
MAX_RESPONSE_WORDS = 45
OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "demo_data"

# Sentences put before / after a phrasing. Each is a whole sentence, so any combination reads well.
PREFIXES = ["", "Hi!", "Hello.", "Hey there!", "Good morning.", "Good afternoon!", "Quick question.",
            "Hoping you can help.", "I'm new to Tidewren.", "I'm the admin for our team."]
SUFFIXES = ["", "Thanks!", "Thank you.", "Thanks in advance.", "Cheers.", "Much appreciated."]


@dataclass(frozen=True)
class Intent:
    name: str
    response: str  # the one canonical answer, 1-3 sentences
    facts: tuple[str, ...]  # exact substrings of `response` a generic answer would not contain
    train: tuple[str, ...]  # phrasings that train queries are built from
    held_out: tuple[str, ...]  # phrasings used only for eval queries


INTENTS = [
    Intent(
        "opening_hours",
        "Tidewren support is open Monday to Friday, 7:30 am to 6:30 pm Central European Time, "
        "and on Saturdays from 9 am to 1 pm.",
        ("7:30 am to 6:30 pm", "9 am to 1 pm"),
        ("What are your opening hours?", "When is Tidewren support open?", "what time does support open",
         "Are you open on weekends?", "Tell me your support hours.", "When can I reach a support agent?",
         "Until what time is the support team available on weekdays?"),
        ("At what hours can I get help from your staff?", "Is anyone around to help on a Saturday, and when?"),
    ),
    Intent(
        "pricing_plans",
        "Tidewren has a free Pebble plan for up to 3 users, Harbor at $14 per user per month, "
        "Lighthouse at $29 per user per month, and Fleet with custom pricing.",
        ("$14 per user per month", "$29 per user per month", "Pebble"),
        ("How much does Tidewren cost?", "What are your pricing plans?", "List the plans and their prices.",
         "What's the price of the Lighthouse plan?", "how much is harbor per user",
         "Is there a free plan?", "Can you explain the different subscription tiers?"),
        ("What would we pay per seat each month?", "Compare the costs of your paid packages for me."),
    ),
    Intent(
        "refund_policy",
        "Annual plans are refunded in full within 21 days of purchase; request it under "
        "Settings > Billing > Refund request. Monthly plans are not refunded.",
        ("21 days", "Settings > Billing > Refund request"),
        ("What is your refund policy?", "Can I get a refund?", "How long do I have to ask for my money back?",
         "I bought an annual plan by mistake. Can I get refunded?", "how do i request a refund",
         "Do you refund monthly subscriptions?", "Where do I submit a refund request?"),
        ("We regret upgrading last week. Is it possible to be reimbursed?",
         "Is there a deadline for getting our payment returned?"),
    ),
    Intent(
        "password_reset",
        "On the sign-in page click \"Forgot passphrase?\" and enter your work email. "
        "The reset link we send is valid for 45 minutes.",
        ("Forgot passphrase?", "45 minutes"),
        ("How do I reset my password?", "I forgot my password.", "I'm locked out of my account. What do I do?",
         "how can i change a forgotten password", "Reset my password, please.",
         "How long is the password reset link valid?", "Where is the password reset option?"),
        ("I can't remember my login credentials. How do I get back in?",
         "My sign-in secret is gone from memory, what now?"),
    ),
    Intent(
        "export_limits",
        "Each CSV export holds up to 25,000 rows, and a workspace can run 10 exports per hour. "
        "Exports are under Workspace > Tools > Export data.",
        ("25,000 rows", "10 exports per hour", "Workspace > Tools > Export data"),
        ("What are the export limits?", "How many rows can I export to CSV?", "How do I export my data?",
         "Is there a limit on how often I can export?", "where is the export button",
         "Explain the data export restrictions.", "Can I download my boards as a spreadsheet?"),
        ("Is there a cap on the size of a CSV download?", "How big can a data dump be, and how frequently?"),
    ),
    Intent(
        "api_rate_limits",
        "The Tidewren API allows 600 requests per minute per token on Harbor and 2,400 on Lighthouse. "
        "Over the limit you get HTTP 429 with a Retry-After header.",
        ("600 requests per minute", "2,400"),
        ("What are the API rate limits?", "How many API requests can I make per minute?",
         "Why am I getting 429 errors from the API?", "what's the api throttle on lighthouse",
         "Is the API rate limited?", "Tell me the request limits for API tokens.",
         "How fast can my script call your API?"),
        ("How many calls can our integration send before being throttled?",
         "What request quota applies to the REST endpoints?"),
    ),
    Intent(
        "data_retention",
        "Deleted items stay in the Driftbin for 75 days and are then purged for good. "
        "Audit logs are kept for 400 days.",
        ("Driftbin", "75 days", "400 days"),
        ("How long do you keep deleted data?", "What is your data retention policy?",
         "Can I recover something I deleted?", "how long are audit logs kept",
         "Where do deleted boards go?", "When is deleted data permanently removed?",
         "Explain how long you retain our records."),
        ("I trashed a file by accident last month. Is it still recoverable?",
         "How many days until removed content is gone forever?"),
    ),
    Intent(
        "sso_setup",
        "SSO is part of the Fleet plan. Set it up under Admin Console > Identity > SAML connections; "
        "we support Okta, Entra ID and Keycloak.",
        ("Fleet plan", "Admin Console > Identity > SAML connections"),
        ("How do I set up SSO?", "Do you support single sign-on?", "Where do I configure SAML?",
         "Can we log in with Okta?", "how to enable sso for my team", "Which plan includes SSO?",
         "Walk me through configuring single sign-on."),
        ("Our IT department wants employees to authenticate through our identity provider. How?",
         "Where are the enterprise login integration settings?"),
    ),
    Intent(
        "seat_limits",
        "A Harbor workspace can have up to 150 seats and a Lighthouse workspace up to 1,200 seats. "
        "Fleet has no seat limit.",
        ("150 seats", "1,200 seats"),
        ("How many users can a workspace have?", "What are the seat limits?",
         "Is there a maximum number of members on Harbor?", "how many seats does lighthouse allow",
         "Can I add unlimited users?", "What's the user cap per plan?", "Tell me the member limits."),
        ("Our company has 300 staff. Will they all fit on one account?",
         "What is the largest team size each subscription supports?"),
    ),
    Intent(
        "invoice_download",
        "Invoices are under Settings > Billing > Invoice history; click the PDF icon next to any month. "
        "Only workspace owners and billing admins can see them.",
        ("Settings > Billing > Invoice history", "billing admins"),
        ("Where can I download my invoices?", "How do I get an invoice?", "I need a PDF of last month's bill.",
         "where are invoices", "Can I see my past invoices?", "Who can access invoices?",
         "Show me how to find our billing history."),
        ("Our accountant needs copies of the receipts. Where do I get them?",
         "How can I obtain statements for what we were charged?"),
    ),
    Intent(
        "cancel_subscription",
        "To cancel, go to Settings > Billing > Plan and choose \"Downgrade to Pebble\". "
        "Paid features stay active until the end of the current billing period.",
        ("Settings > Billing > Plan", "Downgrade to Pebble"),
        ("How do I cancel my subscription?", "I want to cancel my plan.", "How can I stop paying for Tidewren?",
         "cancel my account please", "What happens when I cancel?", "Where is the cancel button?",
         "Can I downgrade to the free plan?"),
        ("We no longer need the paid service. How do we end it?",
         "How do I terminate our recurring billing?"),
    ),
    Intent(
        "two_factor",
        "Turn on two-factor under Profile > Security > Two-step login. Tidewren supports authenticator apps "
        "and passkeys, and gives you 10 backup codes.",
        ("Profile > Security > Two-step login", "10 backup codes"),
        ("How do I enable two-factor authentication?", "Do you support 2FA?", "Where do I turn on 2FA?",
         "how do i set up an authenticator app", "Can I use a passkey?",
         "How many backup codes do I get?", "Make my account more secure with two-factor, how?"),
        ("I'd like a second verification step when logging in. Where is that setting?",
         "How do I add an extra layer of protection to my sign-in?"),
    ),
    Intent(
        "storage_quota",
        "Each Harbor seat adds 40 GB of storage and each Lighthouse seat adds 250 GB, pooled across "
        "the workspace. A single file can be up to 8 GB.",
        ("40 GB", "250 GB", "8 GB"),
        ("How much storage do I get?", "What is the storage quota?", "What's the maximum file size?",
         "how much space per user on harbor", "Is storage shared across the workspace?",
         "Can I upload a 5 GB video?", "Tell me the storage limits."),
        ("How much room do we have for attachments?", "What's the disk allowance for each member?"),
    ),
    Intent(
        "file_types",
        "Tidewren previews 62 file types, including PDF, DOCX, SVG, MP4 and its own .twd boards. "
        "The full list is under Help > File formats.",
        ("62 file types", ".twd", "Help > File formats"),
        ("What file types are supported?", "Can I preview PDFs in Tidewren?", "Which formats can I upload?",
         "does tidewren support svg", "Where can I see the list of supported formats?",
         "What is a .twd file?", "Will my Word documents show a preview?"),
        ("Which kinds of documents can be viewed directly in the app?",
         "What attachment extensions get rendered inline?"),
    ),
    Intent(
        "phone_number",
        "You can call Tidewren support on +44 20 3987 5521 in the UK or +1 646 555 0187 in the US "
        "during support hours.",
        ("+44 20 3987 5521", "+1 646 555 0187"),
        ("What is your phone number?", "Can I call support?", "How do I reach you by phone?",
         "what's the us support number", "Give me a number to call.", "Do you have a UK phone line?",
         "Is there a hotline I can dial?"),
        ("I'd rather talk to a person. Which number should I ring?",
         "How can I speak with someone from your team over the telephone?"),
    ),
    Intent(
        "office_address",
        "Tidewren Software's head office is at Wharf House, 18 Gullstone Quay, Bristol BS1 6QA, "
        "United Kingdom.",
        ("18 Gullstone Quay", "Bristol BS1 6QA"),
        ("What is your office address?", "Where is Tidewren located?", "Where are your headquarters?",
         "what's your postal address", "Can I visit your office?", "Which city is Tidewren based in?",
         "Give me your mailing address."),
        ("Where should we send a letter to your company?", "Where is your main building?"),
    ),
    Intent(
        "uptime_sla",
        "Fleet customers get a 99.95% uptime SLA with service credits, and Lighthouse gets 99.9%. "
        "Live status is at status.tidewren.io.",
        ("99.95%", "status.tidewren.io"),
        ("What is your SLA?", "What uptime do you guarantee?", "Is Tidewren down right now?",
         "where can i check service status", "Do you offer service credits for outages?",
         "What's the availability commitment on Fleet?", "Tell me about your uptime guarantee."),
        ("How reliable is the service contractually?", "Where do I see whether there's an ongoing incident?"),
    ),
    Intent(
        "student_discount",
        "Students and teachers get Lighthouse for $4 per user per month with a verified school email. "
        "Apply under Settings > Billing > Education offer.",
        ("$4 per user per month", "Settings > Billing > Education offer"),
        ("Do you have a student discount?", "Is there an education discount?", "I'm a teacher. Do I get a deal?",
         "how much is tidewren for students", "How do I apply for the education offer?",
         "Do universities get cheaper pricing?", "Can my class use Tidewren at a discount?"),
        ("I'm enrolled at college. Is there reduced pricing for me?",
         "What does an academic account cost?"),
    ),
    Intent(
        "nonprofit_discount",
        "Registered nonprofits get 40% off Harbor and Lighthouse. Email your charity registration number "
        "to good@tidewren.io to apply.",
        ("40% off", "good@tidewren.io"),
        ("Do you offer a nonprofit discount?", "Is there a discount for charities?",
         "How do nonprofits apply for a discount?", "we're a charity, any deals",
         "How much off do nonprofits get?", "Where do I send our charity registration?",
         "Tell me about pricing for non-profit organisations."),
        ("Our foundation runs on donations. Can we pay less?", "Are NGOs eligible for special rates?"),
    ),
    Intent(
        "free_trial",
        "New workspaces get a 17-day free trial of Lighthouse with no card needed. When it ends, the "
        "workspace drops to Pebble unless you pick a plan.",
        ("17-day free trial", "drops to Pebble"),
        ("Do you have a free trial?", "How long is the trial?", "Do I need a credit card for the trial?",
         "what happens when my trial ends", "Can I try Lighthouse for free?", "Is there a trial period?",
         "Tell me about the trial."),
        ("Can we test the product before paying?", "How many days can I evaluate it at no cost?"),
    ),
    Intent(
        "contact_email",
        "Write to crew@tidewren.io or use the \"Ask the Crew\" chat in the app. "
        "On paid plans we reply within 4 business hours.",
        ("crew@tidewren.io", "4 business hours"),
        ("How do I contact support?", "What is your support email?", "How fast do you reply to tickets?",
         "how do i reach customer service", "Is there live chat?", "Where do I send a support request?",
         "Give me your email address for help."),
        ("I have a problem and need assistance. Who do I write to?",
         "What's the quickest way to get in touch with your helpdesk?"),
    ),
    Intent(
        "delete_workspace",
        "A workspace owner can delete the workspace under Settings > Workspace > Danger zone by typing the workspace "
        "name to confirm. All data is erased after 9 days.",
        ("Settings > Workspace > Danger zone", "9 days"),
        ("How do I delete my workspace?", "I want to delete all our data.", "Where is the delete workspace option?",
         "how do i close my tidewren account for good", "Who can delete a workspace?",
         "How long until a deleted workspace is erased?", "Remove our workspace permanently, how?"),
        ("We are shutting the team down. How do we wipe everything?",
         "What are the steps to permanently destroy our organisation's space?"),
    ),
    Intent(
        "data_residency",
        "Tidewren stores data in Frankfurt by default. Fleet customers can choose Dublin, Montreal or Sydney "
        "under Admin Console > Data > Region.",
        ("Frankfurt", "Admin Console > Data > Region"),
        ("Where is my data stored?", "Which data centers do you use?", "Can I choose my data region?",
         "is our data hosted in the eu", "Do you offer data residency?", "Where are your servers?",
         "How do I move our data to Australia?"),
        ("Our compliance team asks in which country the files physically live. What do I tell them?",
         "Can we pick the hosting location?"),
    ),
    Intent(
        "slack_integration",
        "Connect Slack under Workspace > Integrations > Slack and pick a channel for each board. "
        "Type /tidewren new in Slack to create a card.",
        ("Workspace > Integrations > Slack", "/tidewren new"),
        ("How do I connect Slack?", "Does Tidewren integrate with Slack?",
         "Can I create cards from Slack?", "how to set up the slack app", "Where are the Slack settings?",
         "What's the Slack command for a new card?", "Send board updates to a Slack channel, how?"),
        ("Our team chats all day in Slack. Can it talk to Tidewren?",
         "How do I hook up our messaging tool so notifications appear there?"),
    ),
    Intent(
        "payment_methods",
        "We accept Visa, Mastercard, American Express and SEPA Direct Debit. Fleet customers can also pay "
        "by bank transfer on net-45 invoice terms.",
        ("SEPA Direct Debit", "net-45"),
        ("What payment methods do you accept?", "Can I pay by bank transfer?", "Do you take American Express?",
         "can i pay with direct debit", "Which cards do you accept?", "Do you offer invoice payment terms?",
         "How can I pay for Tidewren?"),
        ("Our finance department can't use credit cards. What are our options?",
         "Which ways of settling the bill are available?"),
    ),
    Intent(
        "version_history",
        "Version history keeps every change for 60 days on Harbor and 3 years on Lighthouse. "
        "Open it on any board with Ctrl+Alt+H.",
        ("60 days", "3 years", "Ctrl+Alt+H"),
        ("How do I see version history?", "Can I restore an older version of a board?",
         "How long is version history kept?", "how do i undo changes from last week",
         "What's the shortcut for version history?", "Is there a revision history?",
         "Roll back a board to yesterday, how?"),
        ("Someone overwrote our roadmap. Can I get the previous state back?",
         "How far back can I look at earlier edits?"),
    ),
]


def normalize(text: str) -> str:
    """Case- and punctuation-blind form of a query, for telling queries apart."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def wrap(phrasing: str, prefix: str, suffix: str) -> str:
    if suffix and not phrasing.endswith((".", "?", "!")):  # casual phrasing: "..., thanks!"
        phrasing, suffix = f"{phrasing},", suffix[0].lower() + suffix[1:]
    return " ".join(part for part in (prefix, phrasing, suffix) if part)


def pick_queries(phrasings: tuple[str, ...], n: int, rng: random.Random) -> list[str]:
    """n wrapped queries: each phrasing bare first, then wrapped ones, round-robin over phrasings."""
    if n < len(phrasings):
        raise ValueError(f"asked for {n} queries from {len(phrasings)} phrasings; every phrasing must be used")
    pools = []
    for phrasing in phrasings:
        combos = [(p, s) for p, s in itertools.product(PREFIXES, SUFFIXES) if p or s]
        rng.shuffle(combos)
        pools.append([wrap(phrasing, p, s) for p, s in combos])
    queries = list(phrasings)
    for pool in itertools.cycle(pools):
        if len(queries) == n:
            break
        queries.append(pool.pop())
    return queries


def check_intent(intent: Intent) -> None:
    """Raise ValueError if an intent breaks the dataset's rules (facts, length, distinct phrasings)."""
    words = len(intent.response.split())
    if words > MAX_RESPONSE_WORDS:
        raise ValueError(f"{intent.name}: response has {words} words, at most {MAX_RESPONSE_WORDS} allowed")
    if not 2 <= len(intent.facts) <= 3:
        raise ValueError(f"{intent.name}: needs 2-3 facts, has {len(intent.facts)}")
    for fact in intent.facts:
        if fact not in intent.response:
            raise ValueError(f"{intent.name}: fact {fact!r} is not a substring of its response")
    phrasings = [normalize(p) for p in intent.train + intent.held_out]
    if len(set(phrasings)) != len(phrasings):
        raise ValueError(f"{intent.name}: two phrasings are the same after normalisation")


def build_rows(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """The (train, eval) rows; train is shuffled, eval is grouped by intent."""
    train, evals, owner = [], [], {}
    for intent in INTENTS:
        check_intent(intent)
        rng = random.Random(f"{seed}/{intent.name}")  # per intent: editing one intent leaves the others alone
        split = {"train": pick_queries(intent.train, TRAIN_PER_INTENT, rng),
                 "eval": pick_queries(intent.held_out, EVAL_PER_INTENT, rng)}
        for name, queries in split.items():
            for query in queries:
                key = normalize(query)
                if key in owner:
                    raise ValueError(f"query {query!r} ({intent.name}, {name}) duplicates one of {owner[key]}")
                owner[key] = f"{intent.name}, {name}"
                row = {"query": query, "response": intent.response, "intent": intent.name,
                       "facts": list(intent.facts)}
                (train if name == "train" else evals).append(row)
    random.Random(seed).shuffle(train)
    return train, evals


def render_jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def render_files(seed: int = SEED) -> dict[str, bytes]:
    """File name -> exact bytes of each generated file."""
    train, evals = build_rows(seed)
    return {"train.jsonl": render_jsonl(train), "eval.jsonl": render_jsonl(evals)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help=f"where to write (default {OUT_DIR})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the files in --out-dir differ from a regeneration")
    args = parser.parse_args(argv)

    files = render_files()
    if args.check:
        stale = [name for name, data in files.items()
                 if not (args.out_dir / name).is_file() or (args.out_dir / name).read_bytes() != data]
        for name in stale:
            print(f"{args.out_dir / name} is missing or out of date; run: python scripts/make_demo_data.py",
                  file=sys.stderr)
        if not stale:
            print(f"{', '.join(files)} in {args.out_dir} are up to date")
        return 1 if stale else 0
    for name, data in files.items():
        with atomic_write(args.out_dir / name, "wb") as f:
            f.write(data)
        print(f"wrote {args.out_dir / name}: {len(data.splitlines())} rows")
    print(f"{len(INTENTS)} intents, {TRAIN_PER_INTENT} train + {EVAL_PER_INTENT} eval queries each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
