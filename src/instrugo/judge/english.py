"""Common English words: with the topics' fact vocabulary they tell real words from gibberish.

A word counts as known when it, or the word left after stripping a common suffix, is in the vocabulary.
"""

from __future__ import annotations

COMMON_WORDS = frozenset("""
a able about above across act action actually add after again against age ago agree air all allow almost alone
along already also although always am among amount an and animal another answer any anyone anything appear
area arm around arrive art as ask at away back bad ball base be bear beat beautiful because become bed been
before begin behind being believe below best better between big bird bit black blood blue board boat body
book born both bottom box boy break bright bring brother brown build built burn business but buy by call came
can car care carry case cat catch cause center certain chance change character check child children choose
city class clean clear close cold color come common company complete consider contain continue control cook
cool copy corner cost could count country course cover create cross cry current cut dark data day dead deal
dear decide deep describe detail develop did die different difficult direct do doctor does dog done door
down draw dream drink drive drop dry during each early earth easy eat edge effect egg eight either else end
energy enough enter even evening event ever every everyone everything exact example except expect experience
explain eye face fact fall family far farm fast father fear feel feet few field fight figure fill final
find fine finish fire first fish five floor fly follow food foot for force form forward found four free
friend from front full fun game garden gave general get girl give glad glass go god gold gone good got great
green ground group grow guess guide had hair half hand happen happy hard has hat have he head hear heard heart
heat heavy held help her here high hill him his history hit hold hole home hope horse hot hour house how
however huge human hundred idea if important in include increase indeed inside instead interest into is
island it its itself job join just keep kept key kind king knew know known land language large last late
later laugh law lay lead learn least leave left leg less let letter level lie life light like line list
listen little live long look lose lost lot loud love low machine made main make man many map mark matter may
me mean measure meet member men middle might mile milk mind minute miss modern moment money month moon more
morning most mother mountain mouth move much music must my name nation natural near need never new next night
nine no none north nose not note nothing notice now number object occur of off offer office often oil old on
once one only open or order other our out outside over own page paper part party pass past pay people per
perhaps period person pick picture piece place plan plant play please point poor popular position possible
power practice prepare present press pretty probably problem produce product provide public pull purpose
push put question quick quickly quiet quite race rain raise ran rather reach read ready real really reason
receive record red region remain remember report rest result return rich ride right ring rise river road rock
role room root round rule run safe said same sat save saw say school science sea season seat second see seem
seen sell send sense sentence serve set seven several shape share she ship short should show side sign simple
since sing single sister sit six size skin sky sleep slow small smell snow so soft soil some someone
something sometimes son song soon sound south space speak special speed spend spring stand star start state
stay step still stone stop store story street strong student study subject such sudden summer sun support
sure surface system table take talk tall teach team tell ten term test than thank that the their them then
there these they thing think third this those though thought thousand three through throw thus time tiny to
today together told too took top total touch toward town trade travel tree trip trouble true try turn two
type under understand unit until up upon us use usual usually valley value very visit voice wait walk wall
want war warm was wash watch water wave way we wear weather week weight well went were west what wheel when
where whether which while white who whole whose why wide wild will win wind window winter wish with within
without woman women wonder wood word work world would write written wrong year yes yet you young your
yourself able above abroad according activity actor address adult advice afraid afternoon agency allowed
ancient announce annual anymore appropriate approach argue army arrange article artist asleep attack
attention audience author available average avoid aware baby balance bank bar basic battle beach beyond bill
billion bone border bottle brain branch bread breath bridge brief broad budget camera campaign capital career
carbon careful cell central century chain chair challenge chapter charge cheap chemical chief choice church
citizen civil claim climate clothes cloud club coast coffee collect college column combine comfortable
community compare computer concern condition conference congress connect contact context contract cost
council court crime crop culture cup customer cycle damage dance danger daughter death debate decade decision
defense degree deliver demand department depend design desk despite destroy device diet difference dinner
discover discuss disease distance divide document dollar double doubt drug due dust duty economy edition
education effort election element else employee empty enemy engine enjoy entire environment equal escape
especially establish estimate evidence exist expert extend extra factor fail fair faith famous fan fashion
feature federal fee female fiber film finally financial finger firm fit flat flight flow flower focus
foreign forest forget formal former fresh fruit fuel function fund future gain gas gene generation gift
global goal government grade grain grass gray growth gun habit hall handle hang hardly health hero hide
hole holiday honey hospital host hotel huge hunt husband ice identify image imagine impact improve income
indicate industry influence information injury insect instance institution instrument iron issue item jump
justice kid kill kitchen knee knowledge lack lake large largely launch lawyer layer leader leaf league lesson
library lift limit link liquid living local location lunch magazine mail major male manage manner market
marriage mass master material meal media medical medicine memory mention message metal method military
million mineral minor mission mix model moral mostly motion movement movie museum narrow native nature
nearly necessary neck negative neighbor nest network news newspaper normal novel nurse ocean odd officer
official online operation opinion option orange organ organization origin original owner pain paint pair
palace pattern peace percent perfect perform physical pilot plain planet plastic plate player pocket poem
poet police policy political pollution pool population port positive pot pound powerful prefer pressure
price pride primary prince principle print prison private prize process professor profit program project
property protect protein prove pure quality quarter queen radio rare rate raw reaction reality recent recently
recognize reduce reflect relate release religion rely remove rent repeat reply represent require research
resource respond response responsible restaurant reveal rice risk rope rough route royal safety salt sand
scale scene schedule score screen search secret section security seed select series serious service session
settle shade shadow sharp sheet shell shift shoe shop shot shoulder sight silver similar site situation skill
smart smile smoke social society software solid solution sort source space species speech spirit sport spot
spread square staff stage standard station statue steel stick stock stomach storm strange strategy stream
strength stress structure style success sugar suggest suit supply surprise survive sweet symbol tail task
taste tax tea technology teeth temperature tend tension theory thick thin threat ticket tie tight tired title
tone tongue tool tooth topic tour tower track tradition traffic train transport treat treatment trial truck
trust truth twice typical uncle union unique universe university unless upper urban useful user vast vehicle
version victim view village violence virus visible vision vital volume vote wage waste wealth weapon wet
whale wheat wife wine wing wire wise wood wool worker worry worth yard yellow youth zone
""".split())

# Function words: never topic terms, never forbidden or counted keywords.
STOPWORDS = frozenset("""
a an the and or but nor of to in on at by for with from as is are was were be been being it its this that these
those there their they them he she his her him we our us you your i me my not no so if than then also can could
will would may might must do does did has have had into about over under more most some any all each such very
one two which who whom what when where while how why just only other many much few own same both""".split())
SUFFIXES = ("'s", "ies", "es", "s", "ed", "ing", "ly", "er", "est", "al", "ation", "ment", "ness", "ful")


def word_forms(word: str) -> list[str]:
    """The word and what is left after stripping one common suffix (plus an 'e' or 'y' some stems need)."""
    forms = [word]
    for suffix in SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            stem = word[:-len(suffix)]
            forms += [stem, stem + "e", stem + "y"]
            if len(stem) >= 4 and stem[-1] == stem[-2]:  # running -> run
                forms.append(stem[:-1])
    return forms
