"""Generate lorakit's demo dataset: support questions about Tidewren, a fictional SaaS company.

Every fact (prices, hours, menu paths, limits, addresses) is invented, so the base model cannot know
them and an adapter that answers them correctly has learned them from this data.

Each intent has one canonical answer, its key facts (exact substrings of the answer, used to score
accuracy) and at least 36 hand-written phrasings of the question: different vocabulary, sentence
structure and register (terse keywords, casual chat, formal, a question inside a short story) and
the different sub-aspects the answer covers. Per intent, a seeded `random.Random` shuffles the
phrasings and holds 6 of them out; eval queries are 5 of those held-out phrasings, and train queries
are all the other phrasings (at least 30), each used once, plus greeting/thanks-wrapped copies to
fill 35 rows. So eval wordings come from the same distribution as train wordings, yet no eval
phrasing occurs in train: the eval measures whether the adapter generalises to new wordings, not
whether it memorised them. No phrasing may repeat across intents (after normalisation), and the
output is byte-identical on every run.

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
HELD_OUT_PER_INTENT = 6  # phrasings never trained on; EVAL_PER_INTENT of them become eval queries
MIN_PHRASINGS = 36  # so that at least 30 distinct phrasings per intent are left for train
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
    phrasings: tuple[str, ...]  # distinct wordings of the question; split into train / held-out by seed


INTENTS = [
    Intent(
        "opening_hours",
        "Tidewren support is open Monday to Friday, 7:30 am to 6:30 pm Central European Time, "
        "and on Saturdays from 9 am to 1 pm.",
        ("7:30 am to 6:30 pm", "9 am to 1 pm"),
        ("What are your opening hours?", "When is Tidewren support open?", "what time does support open",
         "Are you open on weekends?", "Tell me your support hours.", "When can I reach a support agent?",
         "Until what time is the support team available on weekdays?",
         "At what hours can I get help from your staff?", "Is anyone around to help on a Saturday, and when?",
         "support hours?", "opening times", "hours on saturday?", "Is support open on Sundays?",
         "What time does the support desk close in the evening?", "What time zone are your support hours in?",
         "Are your hours given in CET or UK time?",
         "is anyone on support right now? it's about 7pm here in Berlin",
         "When does your help team start in the morning?", "How early can I get hold of support on a weekday?",
         "I'm in Paris and it's 8 am. Is your team online yet?", "Which days of the week is support staffed?",
         "Do you work Saturdays?", "What are the business hours of your customer support?",
         "Could you let me know when your support team is working?", "hey when r u guys open",
         "Our team starts work at 7 am. Is your support desk already available then?",
         "How late on a Friday can I still get help?", "Is support available around the clock, 24/7?",
         "What hours do your agents keep?", "Kindly state the hours during which support operates.",
         "When is the help desk staffed on Saturday mornings?", "What time does support shut on Saturday?",
         "weekday support hours cet", "During which hours are you reachable for questions?",
         "If I have a problem at 6 pm on a Tuesday, is anyone still there?",
         "Do you have weekend support coverage?", "What's your schedule for customer support?",
         "At what time does your support day end?"),
    ),
    Intent(
        "pricing_plans",
        "Tidewren has a free Pebble plan for up to 3 users, Harbor at $14 per user per month, "
        "Lighthouse at $29 per user per month, and Fleet with custom pricing.",
        ("$14 per user per month", "$29 per user per month", "Pebble"),
        ("How much does Tidewren cost?", "What are your pricing plans?", "List the plans and their prices.",
         "What's the price of the Lighthouse plan?", "how much is harbor per user", "Is there a free plan?",
         "Can you explain the different subscription tiers?", "What would we pay per seat each month?",
         "Compare the costs of your paid packages for me.", "pricing?", "plan prices",
         "price per user for lighthouse", "What does the Fleet plan cost?", "How much is the Harbor plan?",
         "Which plan is free, and how many users does it cover?", "Is Pebble free?",
         "What's the difference in price between Harbor and Lighthouse?", "what plans do you have",
         "We're a team of 12 evaluating tools. What would Tidewren's paid tiers cost us per person?",
         "How many tiers do you offer and what do they cost?", "Do you publish your prices?",
         "What's the monthly cost per user?", "Kindly provide an overview of your subscription pricing.",
         "how much r the plans", "Is there a plan that costs nothing for a tiny team?",
         "What is the cheapest paid plan?", "How expensive is Tidewren?",
         "What is the per-seat price of each plan?", "Give me a rundown of the plans and what each costs.",
         "How much per month for one Lighthouse user?", "Is Fleet pricing fixed or negotiated?",
         "Our startup has three people. Can we use Tidewren without paying?", "What's the monthly fee?",
         "Where can I see a price list?", "how much does it cost per head",
         "What's the going rate for your top tier?",
         "What does an upgrade from Pebble to Harbor cost per user?", "cost of tidewren plans",
         "Which subscription levels exist and what are their prices?"),
    ),
    Intent(
        "refund_policy",
        "Annual plans are refunded in full within 21 days of purchase; request it under "
        "Settings > Billing > Refund request. Monthly plans are not refunded.",
        ("21 days", "Settings > Billing > Refund request"),
        ("What is your refund policy?", "Can I get a refund?", "How long do I have to ask for my money back?",
         "I bought an annual plan by mistake. Can I get refunded?", "how do i request a refund",
         "Do you refund monthly subscriptions?", "Where do I submit a refund request?",
         "We regret upgrading last week. Is it possible to be reimbursed?",
         "Is there a deadline for getting our payment returned?", "refund window?", "refunds",
         "money back guarantee?",
         "We bought the annual plan last week and changed our minds. Can we get our money back?",
         "How many days after buying an annual plan can I still get a refund?", "Is a monthly plan refundable?",
         "I paid for a month and didn't use it. Will you refund me?", "Where's the refund form in settings?",
         "Can I get part of my annual subscription refunded?",
         "Do annual subscriptions come with a refund period?", "i want my money back",
         "What are the conditions for a refund?",
         "Is it too late for a refund if I bought the yearly plan a month ago?",
         "How do I claim a reimbursement for our yearly plan?",
         "Can the charge for our annual upgrade be reversed?",
         "Please explain how refunds work for yearly billing.",
         "Are refunds offered if we're unhappy with the product?", "refund for yearly plan how",
         "What's the cut-off for asking for a refund?",
         "We were charged for a year upfront and want to undo it. Possible?",
         "Is there a cooling-off period on purchases?",
         "Will I get my money back for the unused part of a monthly plan?",
         "Where in the app do I ask for my money back?", "Could I be refunded for the annual plan I just bought?",
         "Would you return our payment if we changed our mind?", "How do I go about getting a refund?",
         "can i get refunded after 2 weeks", "What's your policy on giving money back?",
         "Is the yearly subscription fee refundable?"),
    ),
    Intent(
        "password_reset",
        "On the sign-in page click \"Forgot passphrase?\" and enter your work email. "
        "The reset link we send is valid for 45 minutes.",
        ("Forgot passphrase?", "45 minutes"),
        ("How do I reset my password?", "I forgot my password.", "I'm locked out of my account. What do I do?",
         "how can i change a forgotten password", "Reset my password, please.",
         "How long is the password reset link valid?", "Where is the password reset option?",
         "I can't remember my login credentials. How do I get back in?",
         "My sign-in secret is gone from memory, what now?", "forgot password", "password reset link expired?",
         "pw reset", "I can't log in because I don't remember my passphrase.",
         "The reset email link doesn't work anymore. How long does it last?",
         "How long do I have to use the reset link?", "Where do I click if I forgot my password?",
         "How can I get back into my account without my password?",
         "What's the procedure for resetting a forgotten passphrase?", "i forgot my pass, help",
         "Which email do I enter to get a password reset link?", "How do I get a new password?",
         "Can you send me a password reset?",
         "My password isn't working and I don't remember the right one. How do I reset it?",
         "Does the password reset link expire?", "Where's the forgot password link on the login screen?",
         "I've been away for months and lost my password. How do I sign back in?",
         "What should I do if I can't recall my password?", "help, cant remember my password",
         "Is there a way to reset a password myself?", "How do I recover my password?",
         "Kindly advise how to reset the password for my account.", "Password recovery steps?",
         "The reset link you sent has expired. How long are they good for?",
         "How do I set a new password if I've forgotten the old one?", "Lost my passphrase, how do i get in?",
         "How do I request a reset link for my login?",
         "I typed my password wrong too many times and can't remember it. What now?"),
    ),
    Intent(
        "export_limits",
        "Each CSV export holds up to 25,000 rows, and a workspace can run 10 exports per hour. "
        "Exports are under Workspace > Tools > Export data.",
        ("25,000 rows", "10 exports per hour", "Workspace > Tools > Export data"),
        ("What are the export limits?", "How many rows can I export to CSV?", "How do I export my data?",
         "Is there a limit on how often I can export?", "where is the export button",
         "Explain the data export restrictions.", "Can I download my boards as a spreadsheet?",
         "Is there a cap on the size of a CSV download?", "How big can a data dump be, and how frequently?",
         "csv export limit?", "max rows per export", "exports per hour", "How do I get my data out as CSV?",
         "Why is my CSV export cut off?",
         "I got an error after running a dozen exports in an hour. What's the limit?",
         "Where in the menu is the data export?", "Can I export all my cards to Excel?",
         "What's the biggest CSV file I can export?", "How many exports can a workspace run per hour?",
         "Is there a row limit on exports?", "Can I pull our boards out into a CSV file?", "export data how",
         "We want to analyse our tasks in a spreadsheet. How do we export them and are there limits?",
         "How often am I allowed to export data?", "Our export of 40k rows got truncated. Why?",
         "Please describe the limits that apply to CSV exports.", "where do i download a csv of my workspace",
         "Does the CSV export have a size limit?", "Can I save a copy of my boards as a CSV?",
         "What's the maximum number of records per export file?", "Is exporting throttled?",
         "i need to export everything to csv, where do i do that", "How do I export a board to a CSV file?",
         "Can I run exports back to back, or is there an hourly cap?", "How large can one export be?",
         "What tool do I use to export workspace data?", "Is there an hourly export quota?",
         "How can I extract our data from Tidewren?"),
    ),
    Intent(
        "api_rate_limits",
        "The Tidewren API allows 600 requests per minute per token on Harbor and 2,400 on Lighthouse. "
        "Over the limit you get HTTP 429 with a Retry-After header.",
        ("600 requests per minute", "2,400"),
        ("What are the API rate limits?", "How many API requests can I make per minute?",
         "Why am I getting 429 errors from the API?", "what's the api throttle on lighthouse",
         "Is the API rate limited?", "Tell me the request limits for API tokens.",
         "How fast can my script call your API?",
         "How many calls can our integration send before being throttled?",
         "What request quota applies to the REST endpoints?", "api rate limit?", "requests per minute api",
         "429 too many requests", "What does HTTP 429 mean from your API?",
         "How do I know how long to wait after hitting the API limit?",
         "Is the API limit higher on Lighthouse than on Harbor?", "What's the per-token request limit?",
         "Our sync job keeps getting throttled by Tidewren. What's the ceiling?",
         "How many API calls per minute does the Harbor plan allow?",
         "Do you send a Retry-After header when I'm throttled?", "What's the max request rate for the Tidewren API?",
         "How much traffic can one API token handle?", "Is there a cap on API usage?",
         "my api calls are failing with too many requests, whats the limit",
         "Could you specify the rate limiting policy of your API?",
         "How many times per minute can I hit the endpoints?", "What happens if I exceed the API limit?",
         "Does each token have its own rate limit?", "api quota harbor vs lighthouse",
         "Is there throttling on the developer API?",
         "I'm building an integration. How many requests per minute can it make?",
         "What's the API rate limit on Lighthouse?", "How quickly can I poll your API?",
         "Can I make thousands of API requests a minute?", "What limits apply to programmatic access?",
         "Why is the API rejecting my requests after a burst?", "How are API requests throttled?",
         "What is the request ceiling for an access token?"),
    ),
    Intent(
        "data_retention",
        "Deleted items stay in the Driftbin for 75 days and are then purged for good. "
        "Audit logs are kept for 400 days.",
        ("Driftbin", "75 days", "400 days"),
        ("How long do you keep deleted data?", "What is your data retention policy?",
         "Can I recover something I deleted?", "how long are audit logs kept", "Where do deleted boards go?",
         "When is deleted data permanently removed?", "Explain how long you retain deleted items and logs.",
         "I trashed a file by accident last month. Is it still recoverable?",
         "How many days until removed content is gone forever?", "driftbin?", "audit log retention",
         "trash retention period", "What is the Driftbin?", "How long do items stay in the trash?",
         "I deleted a card two months ago. Can I still get it back?", "Is there a recycle bin in Tidewren?",
         "How far back do audit logs go?", "When does the trash empty itself?",
         "Do you keep audit logs, and for how long?", "restore deleted card",
         "Where can I find things I deleted?", "How long before deleted items are purged?",
         "Our compliance officer wants to know how long audit trails are stored.",
         "Are deleted files gone immediately?", "how long til trash is emptied",
         "I removed a board by mistake. How do I get it back?", "What happens to content after I delete it?",
         "How long is deleted content retained before permanent deletion?", "Can you undelete a file?",
         "Is there a grace period after deleting a card?", "How many days of audit history do you store?",
         "Please state your retention periods for deleted items and logs.",
         "Do deleted attachments stay somewhere for a while?",
         "Oops, I deleted a whole board yesterday. Is it lost?", "retention policy for deleted stuff",
         "How long do you hold on to activity logs?", "Where does stuff go when I hit delete?"),
    ),
    Intent(
        "sso_setup",
        "SSO is part of the Fleet plan. Set it up under Admin Console > Identity > SAML connections; "
        "we support Okta, Entra ID and Keycloak.",
        ("Fleet plan", "Admin Console > Identity > SAML connections"),
        ("How do I set up SSO?", "Do you support single sign-on?", "Where do I configure SAML?",
         "Can we log in with Okta?", "how to enable sso for my team", "Which plan includes SSO?",
         "Walk me through configuring single sign-on.",
         "Our IT department wants employees to authenticate through our identity provider. How?",
         "Where are the enterprise login integration settings?", "sso?", "saml setup", "okta integration",
         "Do you support Microsoft Entra ID?", "Can I use Keycloak for login?", "Is SSO available on Lighthouse?",
         "Which identity providers do you support?", "Is single sign-on included in Harbor?",
         "Where do I add a SAML connection?", "We use Azure AD. Can staff sign in with it?", "sso which plan",
         "Can our employees sign in with their corporate accounts?", "How do I connect our IdP to Tidewren?",
         "What do I need to enable SAML single sign-on?", "Do you support SAML 2.0?",
         "Can we enforce company login through Okta for everyone?",
         "Where in the admin console is single sign-on?", "Is SSO an extra cost or part of a plan?",
         "How can people log in using our company directory?", "Does Tidewren work with Okta SSO?",
         "Please describe how to configure SAML-based login.", "how do i turn on single sign on",
         "Which IdPs can be plugged in for login?", "Can I set up federated login for our workspace?",
         "We'd like one corporate login for all our tools. Does Tidewren support that?",
         "Do I have to be on Fleet to get SSO?", "Where do the SAML settings live?",
         "Is there support for enterprise identity providers?"),
    ),
    Intent(
        "seat_limits",
        "A Harbor workspace can have up to 150 seats and a Lighthouse workspace up to 1,200 seats. "
        "Fleet has no seat limit.",
        ("150 seats", "1,200 seats"),
        ("How many users can a workspace have?", "What are the seat limits?",
         "Is there a maximum number of members on Harbor?", "how many seats does lighthouse allow",
         "Can I add unlimited users?", "What's the user cap per plan?", "Tell me the member limits.",
         "Our company has 300 staff. Will they all fit on one account?",
         "What is the largest team size each subscription supports?", "max seats?", "user limit harbor",
         "member cap", "How many people can I invite to a Harbor workspace?",
         "Is there a limit on the number of seats on Fleet?",
         "We're about to hire our 160th employee. Can Harbor handle that?", "What's the seat maximum on Lighthouse?",
         "Can a workspace have 2,000 members?", "How big can a team get on Tidewren?", "max users per workspace",
         "Do seat limits differ between plans?", "How many accounts can I add before I have to upgrade?",
         "What's the most users a single workspace can hold?", "Is the number of members capped?",
         "We have about 900 employees. Which plan fits everyone?", "Does Fleet have a user limit?",
         "I can't add more people to our workspace. Is there a seat limit?",
         "How many members can join on the Lighthouse plan?",
         "Please confirm the maximum seat count for each tier.", "how many ppl can we have in one workspace",
         "Is there an upper bound on seats?", "Can we keep adding users forever?",
         "What's the headcount limit for a workspace?", "How many licences can one workspace hold?",
         "Will Harbor let me have 200 users?", "Do large organisations hit a user ceiling?",
         "seat cap on each plan", "How many seats am I allowed?"),
    ),
    Intent(
        "invoice_download",
        "Invoices are under Settings > Billing > Invoice history; click the PDF icon next to any month. "
        "Only workspace owners and billing admins can see them.",
        ("Settings > Billing > Invoice history", "billing admins"),
        ("Where can I download my invoices?", "How do I get an invoice?", "I need a PDF of last month's bill.",
         "where are invoices", "Can I see my past invoices?", "Who can access invoices?",
         "Show me how to find our billing history.",
         "Our accountant needs copies of the receipts. Where do I get them?",
         "How can I obtain statements for what we were charged?", "invoice pdf", "download invoice",
         "billing history?", "I'm a regular member and can't see invoices. Why?", "Where's the invoice for March?",
         "Can I download invoices as PDF?", "How do I get a receipt for my payment?",
         "Who in our team can view billing documents?", "Where do I find old invoices?",
         "need an invoice for our expense report", "Finance wants every invoice from last year. Where are they?",
         "Is there an invoice archive?", "How can a billing admin download invoices?",
         "Where are receipts stored in Tidewren?", "How do I get proof of payment for our subscription?",
         "Where can I retrieve a VAT invoice?", "Please tell me where monthly invoices can be found.",
         "where do i get my receipts", "Which roles have access to the invoice history?",
         "How do I print an invoice?", "I lost the invoice you sent. Where can I download it again?",
         "My boss needs the bill for last quarter. Where do I find it?", "where's our billing statement",
         "Can workspace members download invoices, or only owners?", "What menu shows past charges?",
         "Can I get copies of previous bills?", "How do I find the invoice for a specific month?",
         "Where are the PDFs of our bills kept?"),
    ),
    Intent(
        "cancel_subscription",
        "To cancel, go to Settings > Billing > Plan and choose \"Downgrade to Pebble\". "
        "Paid features stay active until the end of the current billing period.",
        ("Settings > Billing > Plan", "Downgrade to Pebble"),
        ("How do I cancel my subscription?", "I want to cancel my plan.", "How can I stop paying for Tidewren?",
         "cancel my paid plan please", "What happens when I cancel?", "Where is the cancel button?",
         "Can I downgrade to the free plan?", "We no longer need the paid service. How do we end it?",
         "How do I terminate our recurring billing?", "cancel subscription", "unsubscribe from paid plan",
         "stop auto-renewal", "If I cancel today, do I lose paid features immediately?",
         "How do I downgrade from Lighthouse to Pebble?",
         "Do paid features keep working until the end of the billing period after cancelling?",
         "How do I turn off the renewal of our plan?", "Our budget was cut. How can we stop our paid Harbor plan?",
         "Is there a way to end my subscription online?", "how to cancel harbor", "Where in settings do I cancel?",
         "Can I cancel anytime?", "What's the process for cancelling a paid plan?",
         "I'd like to go back to the free tier.", "How do I end my paid membership?",
         "Will I still have access to paid features after cancelling?",
         "Please advise how to discontinue our subscription.",
         "Can I cancel my Lighthouse plan and keep using the free version?",
         "cancel paid plan but keep workspace", "How do I stop being charged every month?",
         "Is cancelling done from the billing page?", "how do i quit paying",
         "When does a cancellation take effect?",
         "We want to switch off the paid subscription at the end of this month. How?",
         "How do I opt out of my plan?", "Can I stop my plan from renewing next month?",
         "Is there a cancel option for monthly billing?", "How can I downgrade my workspace?"),
    ),
    Intent(
        "two_factor",
        "Turn on two-factor under Profile > Security > Two-step login. Tidewren supports authenticator apps "
        "and passkeys, and gives you 10 backup codes.",
        ("Profile > Security > Two-step login", "10 backup codes"),
        ("How do I enable two-factor authentication?", "Do you support 2FA?", "Where do I turn on 2FA?",
         "how do i set up an authenticator app", "Can I use a passkey?", "How many backup codes do I get?",
         "Make my account more secure with two-factor, how?",
         "I'd like a second verification step when logging in. Where is that setting?",
         "How do I add an extra layer of protection to my sign-in?", "2fa?", "mfa setup", "backup codes",
         "Do you support multi-factor authentication?", "Can I use Google Authenticator with Tidewren?",
         "Does Tidewren support passkeys?", "Where are the two-step login settings?",
         "I got a new phone. How do I set up my authenticator again?", "What 2FA methods are available?",
         "Can I log in with a passkey instead of a code?",
         "How do I require a code from my phone when I sign in?", "Is SMS two-factor supported?",
         "How do I secure my account with a one-time code?", "Where do I find my recovery codes?",
         "enable two step verification", "How many recovery codes does two-factor give me?",
         "Can I protect my login with an authenticator app?", "Is there two-step verification?",
         "Please explain how to activate two-factor login.", "how to turn on 2 factor",
         "Which second factors can I use when signing in?", "Where in my profile do I enable 2FA?",
         "I want to use a passkey for login. Where do I set that up?",
         "Do I get backup codes in case I lose my phone?", "How do I switch on MFA for my account?",
         "Our security policy requires two-factor for everyone. Where do staff enable it?",
         "Is two-step login available?", "Can I add an authenticator to my profile?"),
    ),
    Intent(
        "storage_quota",
        "Each Harbor seat adds 40 GB of storage and each Lighthouse seat adds 250 GB, pooled across "
        "the workspace. A single file can be up to 8 GB.",
        ("40 GB", "250 GB", "8 GB"),
        ("How much storage do I get?", "What is the storage quota?", "What's the maximum file size?",
         "how much space per user on harbor", "Is storage shared across the workspace?",
         "Can I upload a 5 GB video?", "Tell me the storage limits.", "How much room do we have for attachments?",
         "What's the disk allowance for each member?", "storage limit?", "max upload size", "GB per seat",
         "How much storage does a Lighthouse seat come with?", "Is storage pooled or per user?",
         "Can I upload a 10 GB file?", "How large can a single attachment be?",
         "We're running out of space. How much storage do we have?",
         "How much cloud storage is included on Harbor?", "What's the file size limit for uploads?",
         "how big can an upload be", "Does adding seats give us more storage?",
         "How many gigabytes do we get per member?", "Is there a cap on total storage for a workspace?",
         "What's the storage allowance on Lighthouse?",
         "Our designers upload huge video files. What are the size limits?", "How much can we store in Tidewren?",
         "Please specify storage capacity per plan.", "space quota lighthouse",
         "How is storage calculated for a team?", "Will a 7 GB file upload?", "Is there a per-file upload limit?",
         "How much disk space does each user add?", "What's the biggest file I can attach to a card?",
         "how much storage is in harbor vs lighthouse", "Can one user use more than their share of storage?",
         "What is the upload limit for one file?", "How much data can our workspace hold?"),
    ),
    Intent(
        "file_types",
        "Tidewren previews 62 file types, including PDF, DOCX, SVG, MP4 and its own .twd boards. "
        "The full list is under Help > File formats.",
        ("62 file types", ".twd", "Help > File formats"),
        ("What file types are supported?", "Can I preview PDFs in Tidewren?", "Which formats can I preview?",
         "does tidewren support svg", "Where can I see the list of supported formats?", "What is a .twd file?",
         "Will my Word documents show a preview?",
         "Which kinds of documents can be viewed directly in the app?",
         "What attachment extensions get rendered inline?", "supported file formats?", "preview mp4",
         "twd extension", "How many file formats can Tidewren preview?",
         "Can I view spreadsheets without downloading them?", "Does the preview work for videos?",
         "What kind of file ends in .twd?", "Can Tidewren open DOCX attachments?",
         "Which file types get a preview?", "Where's the full list of file formats?",
         "Will an SVG logo display in a card?", "What formats does the viewer handle?",
         "do u support mp4 previews", "Can I see PDF attachments inline?",
         "Is there a list of previewable formats in the help menu?",
         "My colleague sent me a .twd file. What is it?", "Please list the file formats that can be previewed.",
         "Are image files like SVG shown as previews?",
         "Which document types are compatible with the built-in viewer?",
         "How many different file types are supported?", "Can I open Word docs inside Tidewren?",
         "Does Tidewren render video attachments?", "What file extension do Tidewren boards use?",
         "file preview support", "Which uploads can I open without leaving the app?",
         "Will a PowerPoint file preview?", "what formats can tidewren display",
         "Is my file format supported for preview?"),
    ),
    Intent(
        "phone_number",
        "You can call Tidewren support on +44 20 3987 5521 in the UK or +1 646 555 0187 in the US "
        "during support hours.",
        ("+44 20 3987 5521", "+1 646 555 0187"),
        ("What is your phone number?", "Can I call support?", "How do I reach you by phone?",
         "what's the us support number", "Give me a number to call.", "Do you have a UK phone line?",
         "Is there a hotline I can dial?", "I'd rather talk to a person. Which number should I ring?",
         "How can I speak with someone from your team over the telephone?", "phone number?", "support hotline",
         "uk number", "What number do I call from the US?", "Do you have phone support?",
         "Is there a London number for support?", "I'm in New York. Which number should I call?",
         "Can I get someone on the phone?", "What's the telephone number for Tidewren support?",
         "call support number", "Do you offer support by phone in the US?",
         "Is there a number I can ring to talk to an agent?", "What are your contact phone numbers?",
         "I'd like to discuss an issue over the phone. How do I reach you?",
         "Please provide the support telephone numbers.", "whats ur phone number",
         "Do you have a British phone number?", "Can I phone Tidewren?", "Which number do I dial for help in the UK?",
         "I hate email. Can I just call you?", "Is phone support available for customers in America?",
         "How do I get you on the line?", "What's the number for your helpline?",
         "Where can I find your support phone number?", "Do you have an American phone line?",
         "Is voice support offered?", "Can I reach Tidewren by telephone?", "tel number for support"),
    ),
    Intent(
        "office_address",
        "Tidewren Software's head office is at Wharf House, 18 Gullstone Quay, Bristol BS1 6QA, "
        "United Kingdom.",
        ("18 Gullstone Quay", "Bristol BS1 6QA"),
        ("What is your office address?", "Where is Tidewren located?", "Where are your headquarters?",
         "what's your postal address", "Can I visit your office?", "Which city is Tidewren based in?",
         "Give me your mailing address.", "Where should we send a letter to your company?",
         "Where is your main building?", "office address?", "hq location", "head office",
         "What's the street address of Tidewren Software?", "Where is Tidewren's head office?",
         "I need your registered address for a contract. What is it?", "Is Tidewren a UK company?",
         "Which country is Tidewren headquartered in?", "What's your postcode?",
         "Where can I mail documents to you?", "where are you guys based", "Do you have an office in Bristol?",
         "What's the address for deliveries?", "Please provide your company's physical address.",
         "I'd like to drop by in person. Where are you?", "Where's your HQ?",
         "What's the full address of your main office?", "Where should couriers deliver packages for Tidewren?",
         "company address", "Which street is your office on?", "What address should I put on the envelope?",
         "Where do you have your offices?", "What is the address of Tidewren Software?",
         "Where is the company physically located?", "I need your postal address for our vendor form.",
         "In which town is your head office?", "what's your business address"),
    ),
    Intent(
        "uptime_sla",
        "Fleet customers get a 99.95% uptime SLA with service credits, and Lighthouse gets 99.9%. "
        "Live status is at status.tidewren.io.",
        ("99.95%", "status.tidewren.io"),
        ("What is your SLA?", "What uptime do you guarantee?", "Is Tidewren down right now?",
         "where can i check service status", "Do you offer service credits for outages?",
         "What's the availability commitment on Fleet?", "Tell me about your uptime guarantee.",
         "How reliable is the service contractually?", "Where do I see whether there's an ongoing incident?",
         "sla?", "status page", "uptime guarantee lighthouse", "Is there a status page for Tidewren?",
         "What uptime does Lighthouse get?", "Do you compensate customers for downtime?",
         "The app isn't loading for me. Is there an outage?", "How do I find out if Tidewren is having problems?",
         "What's the guaranteed availability percentage?", "is tidewren down",
         "Do you have a service level agreement?", "What happens if you miss your uptime target?",
         "How many nines of uptime do you promise?",
         "Our procurement team needs your availability SLA. What is it?",
         "Where are incidents and maintenance posted?", "Is there an uptime commitment on Harbor?",
         "Please state the contractual uptime for the Fleet plan.", "any outage right now?",
         "Do you publish live system status?", "What credits do we get if the service goes down?",
         "How can I monitor Tidewren's availability?", "What's your downtime policy?",
         "Is uptime guaranteed in the contract?", "site seems down, where do i check",
         "Do you guarantee a percentage of availability?", "How much downtime is acceptable under your SLA?",
         "What availability can enterprise customers expect?", "Where can I follow outage updates?"),
    ),
    Intent(
        "student_discount",
        "Students and teachers get Lighthouse for $4 per user per month with a verified school email. "
        "Apply under Settings > Billing > Education offer.",
        ("$4 per user per month", "Settings > Billing > Education offer"),
        ("Do you have a student discount?", "Is there an education discount?", "I'm a teacher. Do I get a deal?",
         "how much is tidewren for students", "How do I apply for the education offer?",
         "Do universities get cheaper pricing?", "Can my class use Tidewren at a discount?",
         "I'm enrolled at college. Is there reduced pricing for me?", "What does an academic account cost?",
         "student pricing?", "education offer", "teacher discount", "What do students pay for Lighthouse?",
         "How do I verify my school email for the discount?", "I'm a PhD student. Can I get Tidewren cheaper?",
         "Are there special prices for schools?", "Where do I sign up for the education pricing?",
         "Is there a discount for lecturers?",
         "My students need accounts for a semester project. Is there a student rate?",
         "Do you give discounts to educators?", "how do students get the discount",
         "What do I need to qualify for the student offer?", "Is the education discount for Harbor or Lighthouse?",
         "Can high school teachers get reduced pricing?", "Please describe your academic pricing.",
         "cheaper for uni students?", "Do you have an edu plan?", "What's the price for a student per month?",
         "I teach at a secondary school. Is there an educational discount?",
         "Where in billing do I claim the education offer?", "Do pupils get a discount?",
         "Is there campus pricing?", "Does a university email get me a discount?",
         "How much does Lighthouse cost for a teacher?",
         "I'm studying computer science and on a tight budget. Any student deal?",
         "Can a school get discounted Tidewren?", "What discount do academics get?"),
    ),
    Intent(
        "nonprofit_discount",
        "Registered nonprofits get 40% off Harbor and Lighthouse. Email your charity registration number "
        "to good@tidewren.io to apply.",
        ("40% off", "good@tidewren.io"),
        ("Do you offer a nonprofit discount?", "Is there a discount for charities?",
         "How do nonprofits apply for a discount?", "we're a charity, any deals",
         "How much off do nonprofits get?", "Where do I send our charity registration?",
         "Tell me about pricing for non-profit organisations.",
         "Our foundation runs on donations. Can we pay less?", "Are NGOs eligible for special rates?",
         "nonprofit pricing?", "charity discount", "ngo discount",
         "What percentage discount do registered charities get?",
         "Which email do I contact for the nonprofit offer?",
         "We're a registered charity in Scotland. How do we apply for your discount?",
         "Is the nonprofit discount available on Lighthouse?", "Does a 501(c)(3) qualify for reduced pricing?",
         "How big is the charity discount?", "What do I need to provide to get the nonprofit rate?",
         "Can a volunteer organisation get a discount?", "do charities get money off",
         "Is there special pricing for non-governmental organisations?",
         "We're a small animal shelter with no budget. Any discount?",
         "Please explain how charitable organisations can obtain a discount.",
         "Where should nonprofits email to request the discount?", "Do you give discounts to not-for-profits?",
         "How do I prove we're a nonprofit?", "Is Harbor cheaper for charities?",
         "Do community groups that are registered charities get a reduced rate?",
         "non profit discount how to apply", "How much can a registered charity save?",
         "Are there reduced prices for humanitarian organisations?",
         "Does your nonprofit discount apply to both paid plans?", "We're a church. Do you have charity pricing?",
         "Is there a charitable discount?", "Which address do we email our charity number to?",
         "Can our nonprofit get Tidewren at a lower price?"),
    ),
    Intent(
        "free_trial",
        "New workspaces get a 17-day free trial of Lighthouse with no card needed. When it ends, the "
        "workspace drops to Pebble unless you pick a plan.",
        ("17-day free trial", "drops to Pebble"),
        ("Do you have a free trial?", "How long is the trial?", "Do I need a credit card for the trial?",
         "what happens when my trial ends", "Can I try Lighthouse for free?", "Is there a trial period?",
         "Tell me about the trial.", "Can we test the product before paying?",
         "How many days can I evaluate it at no cost?", "free trial?", "trial length", "trial without card",
         "Which plan does the trial include?", "Will I be charged automatically after the trial?",
         "My trial is about to expire. What happens to my workspace?",
         "Can I test Tidewren without entering payment details?", "How long can I use Lighthouse features free?",
         "is the trial really free", "Do new accounts get a trial?", "What plan am I on after the trial ends?",
         "Is a card required to start a trial?", "Can I try before I buy?", "How does the trial work?",
         "We'd like to pilot Tidewren with our team first. Is there a trial?", "Do you offer a demo period?",
         "How many days is the free trial?", "Please describe the terms of your trial.",
         "does the trial need payment info", "What happens to our workspace when the trial is over?",
         "Is there a way to evaluate the paid features without paying?",
         "When my trial finishes, do I have to pay?", "Does the trial expire automatically?",
         "How long before the trial runs out?", "Can I start a trial of the premium plan?",
         "Is there a test period for new workspaces?", "free trial how long and what after",
         "I just signed up. How long do I get Lighthouse for free?"),
    ),
    Intent(
        "contact_email",
        "Write to crew@tidewren.io or use the \"Ask the Crew\" chat in the app. "
        "On paid plans we reply within 4 business hours.",
        ("crew@tidewren.io", "4 business hours"),
        ("How do I contact support?", "What is your support email?", "How fast do you reply to tickets?",
         "how do i reach customer service", "Is there live chat?", "Where do I send a support request?",
         "Give me your email address for help.",
         "I have a problem and need assistance. Who do I write to?",
         "What's the quickest way to get in touch with your helpdesk?", "support email?", "contact support",
         "response time for tickets", "How long does it take to get an answer from support?",
         "Can I chat with support inside the app?", "What address do I email for help?",
         "I emailed you yesterday. How soon should I expect a reply?", "Where is the in-app chat?",
         "What's your customer service email?", "Do you have a chat option?", "how do i message support",
         "How do I open a support ticket?", "What is the expected response time on paid plans?",
         "Please let me know how to reach your support staff in writing.",
         "Is there a way to contact you other than phone?", "How do I report a bug to you?",
         "who do i email about a problem", "What's the turnaround time for support requests?",
         "Where can I ask your support team a question?", "Do paid customers get faster replies?",
         "Is there an email for the support crew?", "Can I talk to support through the app?",
         "How quickly does support answer emails?", "What's the best email to reach your team?",
         "Something broke in our workspace. How do I contact someone?", "Where do I write if I need help?",
         "Do you offer support via email?", "How do I get in touch with Tidewren?"),
    ),
    Intent(
        "delete_workspace",
        "A workspace owner can delete the workspace under Settings > Workspace > Danger zone by typing the workspace "
        "name to confirm. All data is erased after 9 days.",
        ("Settings > Workspace > Danger zone", "9 days"),
        ("How do I delete my workspace?", "I want to delete all our data.", "Where is the delete workspace option?",
         "how do i close my tidewren account for good", "Who can delete a workspace?",
         "How long until a deleted workspace is erased?", "Remove our workspace permanently, how?",
         "We are shutting the team down. How do we wipe everything?",
         "What are the steps to permanently destroy our organisation's space?", "delete workspace",
         "danger zone", "erase workspace data", "Can an admin who isn't the owner delete the workspace?",
         "How do I confirm workspace deletion?", "Once I delete our workspace, when is the data gone?",
         "Our project ended. How do we remove the whole workspace?", "Where's the danger zone in settings?",
         "Is deleting a workspace permanent?", "How do I permanently close our workspace?",
         "What's required to delete a workspace?", "can i delete my whole workspace",
         "I'm the owner. How do I delete everything we have in Tidewren?",
         "How many days after deleting a workspace is the data erased?",
         "Please explain the workspace deletion process.",
         "We're moving to another tool and want all our data removed. How?",
         "Who has permission to remove a workspace?", "Is there a way to wipe our workspace completely?",
         "delete team space", "How can I get rid of an old workspace I don't use?",
         "Under GDPR we want our organisation's data erased. How do we do that?",
         "Why do I have to type the workspace name to delete it?", "How do I shut down a workspace?",
         "What happens to our data when I delete the workspace?", "Can I delete a test workspace I created?",
         "How do I destroy a workspace?", "Where do I go to delete our Tidewren workspace?",
         "remove workspace for good"),
    ),
    Intent(
        "data_residency",
        "Tidewren stores data in Frankfurt by default. Fleet customers can choose Dublin, Montreal or Sydney "
        "under Admin Console > Data > Region.",
        ("Frankfurt", "Admin Console > Data > Region"),
        ("Where is my data stored?", "Which data centers do you use?", "Can I choose my data region?",
         "is our data hosted in the eu", "Do you offer data residency?", "Where are your servers?",
         "How do I move our data to Australia?",
         "Our compliance team asks in which country the files physically live. What do I tell them?",
         "Can we pick the hosting location?", "data region?", "hosting location", "eu data residency",
         "Can we host our workspace in Canada?", "Is data stored in Germany?",
         "Do you have a data center in Ireland?", "Where is data hosted by default?",
         "How do I change the region for our workspace?", "Can I keep our data in Sydney?",
         "Which regions can Fleet customers choose?", "Is our data kept inside the European Union for GDPR?",
         "where r ur servers located", "Do you offer US hosting?",
         "Our Australian customers need local data storage. Is that possible?",
         "Please describe where customer data is physically stored.", "Where is the data region setting?",
         "Which country hosts Tidewren's data?", "Can I select where our data lives?",
         "Is there a Dublin hosting option?", "in which data centre is my workspace",
         "Is data residency only for enterprise customers?", "Do you store data in Germany or the US?",
         "Can I choose a non-EU region?", "How do I pick the geographic location of our data?",
         "What hosting regions are available?", "Where do you physically keep uploaded files?",
         "Does our data stay in Europe?", "Can our workspace data be hosted in a specific country?"),
    ),
    Intent(
        "slack_integration",
        "Connect Slack under Workspace > Integrations > Slack and pick a channel for each board. "
        "Type /tidewren new in Slack to create a card.",
        ("Workspace > Integrations > Slack", "/tidewren new"),
        ("How do I connect Slack?", "Does Tidewren integrate with Slack?", "Can I create cards from Slack?",
         "how to set up the slack app", "Where are the Slack settings?",
         "What's the Slack command for a new card?", "Send board updates to a Slack channel, how?",
         "Our team chats all day in Slack. Can it talk to Tidewren?",
         "How do I hook up our messaging tool so notifications appear there?", "slack?", "slack integration",
         "slash command slack", "How do I post board notifications into Slack?",
         "Can I choose which Slack channel gets updates?", "How do I make a Tidewren card without leaving Slack?",
         "Where do I find the Slack integration in Tidewren?", "Is there a Slack bot for Tidewren?",
         "connect tidewren to slack", "Can each board post to a different Slack channel?",
         "What do I type in Slack to add a card?", "How do I link our Slack workspace?",
         "Please explain how to integrate Slack with our boards.", "Do you have a Slack app?",
         "how do i get tidewren alerts in slack", "Can I get notified in Slack when a card changes?",
         "We'd like card updates in our #dev Slack channel. How?", "Is Slack supported as an integration?",
         "How do I pick a Slack channel for a board?", "Where is the Slack connection in the workspace menu?",
         "What's the slash command for Tidewren?", "Does Tidewren work with Slack?",
         "Can I add tasks to Tidewren from a Slack message?", "Can Tidewren send messages to Slack?",
         "slack notifications setup", "Is it possible to route board activity into Slack?",
         "How can I set up the Tidewren Slack integration?", "Where do I enable Slack for our workspace?"),
    ),
    Intent(
        "payment_methods",
        "We accept Visa, Mastercard, American Express and SEPA Direct Debit. Fleet customers can also pay "
        "by bank transfer on net-45 invoice terms.",
        ("SEPA Direct Debit", "net-45"),
        ("What payment methods do you accept?", "Can I pay by bank transfer?", "Do you take American Express?",
         "can i pay with direct debit", "Which cards do you accept?", "Do you offer invoice payment terms?",
         "How can I pay for Tidewren?", "Our finance department can't use credit cards. What are our options?",
         "Which ways of settling the bill are available?", "payment options?", "pay by card", "sepa?",
         "Can I pay with Mastercard?", "Do you accept Visa?", "Is PayPal accepted?",
         "Can we pay on invoice with net terms?", "What are your payment terms for Fleet?",
         "Can I pay by wire transfer?", "Do you support SEPA payments?", "Can I use my company credit card?",
         "how do i pay", "Which payment types can we use?", "Do you accept Amex?",
         "Can we pay by bank transfer instead of card?", "Please list the accepted means of payment.",
         "Can enterprises pay against an invoice instead of by card?", "do u take debit cards",
         "What cards can I put on file?", "Can I pay via direct debit from a European bank account?",
         "How many days do we have to pay an invoice on Fleet?", "Is paying by bank transfer only for Fleet?",
         "We'd prefer not to use a card. Can we pay another way?", "What forms of payment are supported?",
         "Do you accept payments from a German bank account?", "Can I pay with American Express for Harbor?",
         "Which credit cards work with Tidewren?", "Is card the only way to pay?"),
    ),
    Intent(
        "version_history",
        "Version history keeps every change for 60 days on Harbor and 3 years on Lighthouse. "
        "Open it on any board with Ctrl+Alt+H.",
        ("60 days", "3 years", "Ctrl+Alt+H"),
        ("How do I see version history?", "Can I restore an older version of a board?",
         "How long is version history kept?", "how do i undo changes from last week",
         "What's the shortcut for version history?", "Is there a revision history?",
         "Roll back a board to yesterday, how?",
         "Someone overwrote our roadmap. Can I get the previous state back?",
         "How far back can I look at earlier edits?", "version history?", "revision history retention",
         "keyboard shortcut history", "How do I open version history on a board?",
         "How long are board versions kept on Harbor?", "Does Lighthouse keep a longer version history?",
         "A colleague rewrote half the cards on a board this morning. Can I revert the board?",
         "How do I revert a board to an earlier state?", "Is there an undo history for boards?",
         "How many days of board history does Harbor save?", "What's the key combo to open revisions?",
         "Can I compare older versions of a board?", "restore previous version",
         "How do I go back to last month's version of a board?",
         "Please explain how long previous versions are retained.", "how far back does history go on lighthouse",
         "Can I recover an earlier draft of our plan?", "Where do I find older versions of a board?",
         "Is every edit saved?", "Can I roll back changes made three months ago?",
         "Do you keep snapshots of boards?", "Our board got messed up after a bulk edit. How do I restore it?",
         "How do I view the change history of a board?", "Is there a time limit on restoring old versions?",
         "version history on harbor vs lighthouse", "What's the hotkey for board history?",
         "How long can I go back in time on a board?"),
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
    if not MIN_PHRASINGS <= len(intent.phrasings) <= TRAIN_PER_INTENT + HELD_OUT_PER_INTENT:
        raise ValueError(f"{intent.name}: has {len(intent.phrasings)} phrasings, needs "
                         f"{MIN_PHRASINGS} to {TRAIN_PER_INTENT + HELD_OUT_PER_INTENT}")
    phrasings = [normalize(p) for p in intent.phrasings]
    if len(set(phrasings)) != len(phrasings):
        raise ValueError(f"{intent.name}: two phrasings are the same after normalisation")


def split_phrasings(intent: Intent, rng: random.Random) -> tuple[list[str], list[str]]:
    """(train, held_out) phrasings of one intent: a seeded shuffle, the first HELD_OUT_PER_INTENT held out."""
    phrasings = list(intent.phrasings)
    rng.shuffle(phrasings)
    return phrasings[HELD_OUT_PER_INTENT:], phrasings[:HELD_OUT_PER_INTENT]


def check_phrasings_are_unique(intents: list[Intent]) -> None:
    """Raise ValueError if a phrasing (after normalisation) belongs to two intents."""
    owner = {}
    for intent in intents:
        for phrasing in intent.phrasings:
            key = normalize(phrasing)
            if key in owner and owner[key] != intent.name:
                raise ValueError(f"phrasing {phrasing!r} of {intent.name} duplicates one of {owner[key]}")
            owner[key] = intent.name


def build_splits(seed: int = SEED) -> dict[str, tuple[list[str], list[str]]]:
    """Intent name -> (train phrasings, held-out phrasings)."""
    check_phrasings_are_unique(INTENTS)
    splits = {}
    for intent in INTENTS:
        check_intent(intent)
        rng = random.Random(f"{seed}/{intent.name}")  # per intent: editing one intent leaves the others alone
        splits[intent.name] = split_phrasings(intent, rng)
    return splits


def build_rows(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """The (train, eval) rows; train is shuffled, eval is grouped by intent."""
    splits = build_splits(seed)  # phrasings are unique across intents, so no held-out one is ever trained on
    train, evals, owner = [], [], {}
    for intent in INTENTS:
        train_part, held_out = splits[intent.name]
        rng = random.Random(f"{seed}/{intent.name}/queries")
        split = {"train": pick_queries(tuple(train_part), TRAIN_PER_INTENT, rng),
                 "eval": held_out[:EVAL_PER_INTENT]}  # bare and distinct, like most train queries
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


def generate_main(argv: list[str] | None, description: str, out_dir: Path, files: dict[str, bytes], script: str,
                  summary: str) -> int:
    """The command line of a data generator: write `files` into --out-dir, or --check them (exit 1 if stale)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out-dir", type=Path, default=out_dir, help=f"where to write (default {out_dir})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the files in --out-dir differ from a regeneration")
    args = parser.parse_args(argv)
    if args.check:
        stale = [name for name, data in files.items()
                 if not (args.out_dir / name).is_file() or (args.out_dir / name).read_bytes() != data]
        for name in stale:
            print(f"{args.out_dir / name} is missing or out of date; run: python {script}", file=sys.stderr)
        if not stale:
            print(f"{', '.join(files)} in {args.out_dir} are up to date")
        return 1 if stale else 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        with atomic_write(args.out_dir / name, "wb") as f:
            f.write(data)
        print(f"wrote {args.out_dir / name}: {len(data.splitlines())} rows")
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    return generate_main(argv, __doc__.split("\n")[0], OUT_DIR, render_files(), "scripts/make_demo_data.py",
                         f"{len(INTENTS)} intents, {TRAIN_PER_INTENT} train + {EVAL_PER_INTENT} eval queries each")


if __name__ == "__main__":
    sys.exit(main())
