"""schema.org's class hierarchy, so that asking for a type also finds its subtypes (a MusicEvent is an Event).

The table holds every schema.org class under `Thing`, enumerations and data types left out (nobody extracts an
`EventStatusType`), with multiple parents kept (`LocalBusiness` is an Organization and a Place, `EventSeries` an
Event and a Series). It was derived from schema.org's vocabulary as generated into pydantic-schemaorg 1.0.6 (which
keeps every parent) and msgspec-schemaorg 0.2.1 (newer classes such as `OnlineStore`, `PoliticalParty`), merged.
A type missing here still matches itself, exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache

# Each entry is `Parent: Child Child …`; an indented line continues the entry above.
_TREE = """
Accommodation: Apartment CampingPitch House Room Suite
AchieveAction: LoseAction TieAction WinAction
Action: AchieveAction AssessAction ConsumeAction ControlAction CreateAction FindAction InteractAction MoveAction
    OrganizeAction PlayAction SearchAction SeekToAction SolveMathAction TradeAction TransferAction UpdateAction
AddAction: InsertAction
AdministrativeArea: City Country SchoolDistrict State
AggregateRating: EmployerAggregateRating
AllocateAction: AcceptAction AssignAction AuthorizeAction RejectAction
AnatomicalStructure: Bone BrainStructure Joint Ligament Muscle Nerve Vessel
Article: AdvertiserContentArticle NewsArticle Report SatiricalArticle ScholarlyArticle SocialMediaPosting
    TechArticle
AssessAction: ChooseAction IgnoreAction ReactAction ReviewAction
Audience: BusinessAudience EducationalAudience MedicalAudience PeopleAudience Researcher
AudioObject: AudioObjectSnapshot Audiobook
AutomotiveBusiness: AutoBodyShop AutoDealer AutoPartsStore AutoRental AutoRepair AutoWash GasStation
    MotorcycleDealer MotorcycleRepair
BankAccount: DepositAccount
BioChemEntity: ChemicalSubstance Gene MolecularEntity Protein
BlogPosting: LiveBlogPosting
BodyOfWater: Canal LakeBodyOfWater OceanBodyOfWater Pond Reservoir RiverBodyOfWater SeaBodyOfWater Waterfall
Book: Audiobook
BroadcastChannel: RadioChannel TelevisionChannel
BroadcastService: RadioBroadcastService
CategoryCode: MedicalCode
ChooseAction: VoteAction
Church: CatholicChurch
CivicStructure: Airport Aquarium Beach BoatTerminal Bridge BusStation BusStop Campground Cemetery Crematorium
    EducationalOrganization EventVenue FireStation GovernmentBuilding Hospital MovieTheater Museum MusicVenue
    Park ParkingFacility PerformingArtsTheater PlaceOfWorship Playground PoliceStation PublicToilet RVPark
    StadiumOrArena SubwayStation TaxiStand TrainStation Zoo
Clip: MovieClip RadioClip TVClip VideoGameClip
Collection: ProductCollection
CollectionPage: MediaGallery
ComicStory: ComicCoverArt
Comment: Answer CorrectionComment Question
CommunicateAction: AskAction CheckInAction CheckOutAction CommentAction InformAction InviteAction ReplyAction
    ShareAction
ConstraintNode: StatisticalVariable
ConsumeAction: DrinkAction EatAction InstallAction ListenAction PlayGameAction ReadAction UseAction ViewAction
    WatchAction
ContactPoint: PostalAddress
ControlAction: ActivateAction DeactivateAction ResumeAction SuspendAction
CoverArt: ComicCoverArt
CreateAction: CookAction DrawAction FilmAction PaintAction PhotographAction WriteAction
CreativeWork: AmpStory ArchiveComponent Article Atlas Blog Book Certification Chapter Claim Clip Code Collection
    ComicStory Comment Conversation Course CreativeWorkSeason CreativeWorkSeries DataCatalog Dataset
    DefinedTermSet Diet DigitalDocument Drawing EducationalOccupationalCredential Episode ExercisePlan Game
    Guide HowTo HowToDirection HowToSection HowToStep HowToTip HyperToc HyperTocEntry LearningResource
    Legislation Manuscript Map MathSolver MediaObject MediaReviewItem Menu MenuSection Message Movie
    MusicComposition MusicPlaylist MusicRecording Painting Photograph Play Poster PublicationIssue
    PublicationVolume Quotation Review Sculpture Season SheetMusic ShortStory SoftwareApplication
    SoftwareSourceCode SpecialAnnouncement Statement TVSeason TVSeries Thesis VisualArtwork WebContent WebPage
    WebPageElement WebSite
CreativeWorkSeason: PodcastSeason RadioSeason TVSeason
CreativeWorkSeries: BookSeries MovieSeries Periodical PodcastSeries RadioSeries TVSeries VideoGameSeries
CriticReview: ReviewNewsArticle
DataFeed: CompleteDataFeed
Dataset: DataFeed
DefinedTerm: CategoryCode
DefinedTermSet: CategoryCodeSet
DigitalDocument: NoteDigitalDocument PresentationDigitalDocument SpreadsheetDigitalDocument TextDigitalDocument
DoseSchedule: MaximumDoseSchedule RecommendedDoseSchedule ReportedDoseSchedule
EducationalOccupationalProgram: WorkBasedProgram
EducationalOrganization: CollegeOrUniversity ElementarySchool HighSchool MiddleSchool Preschool School
EmergencyService: FireStation Hospital PoliceStation
EntertainmentBusiness: AdultEntertainment AmusementPark ArtGallery Casino ComedyClub MovieTheater NightClub
Episode: PodcastEpisode RadioEpisode TVEpisode
Event: BusinessEvent ChildrensEvent ComedyEvent CourseInstance DanceEvent DeliveryEvent EducationEvent
    EventSeries ExhibitionEvent Festival FoodEvent Hackathon LiteraryEvent MusicEvent PublicationEvent SaleEvent
    ScreeningEvent SocialEvent SportsEvent TheaterEvent UserInteraction VisualArtsEvent
FinancialProduct: BankAccount CurrencyConversionService InvestmentOrDeposit LoanOrCredit
FinancialService: AccountingService AutomatedTeller BankOrCreditUnion InsuranceAgency
FindAction: CheckAction DiscoverAction TrackAction
FoodEstablishment: Bakery BarOrPub Brewery CafeOrCoffeeShop Distillery FastFoodRestaurant IceCreamShop
    Restaurant Winery
Game: VideoGame
GeoShape: GeoCircle
GovernmentBuilding: CityHall Courthouse DefenceEstablishment Embassy LegislativeBuilding
GovernmentOffice: PostOffice
Grant: MonetaryGrant
HealthAndBeautyBusiness: BeautySalon DaySpa HairSalon HealthClub NailSalon TattooParlor
HomeAndConstructionBusiness: Electrician GeneralContractor HVACBusiness HousePainter Locksmith MovingCompany
    Plumber RoofingContractor
House: SingleFamilyResidence
HowTo: Recipe
HowToItem: HowToSupply HowToTool
ImageObject: Barcode ImageObjectSnapshot
InformAction: ConfirmAction RsvpAction
InsertAction: AppendAction PrependAction
Intangible: ActionAccessSpecification AlignmentObject Audience BedDetails Brand BroadcastChannel
    BroadcastFrequencySpecification Class ComputerLanguage ConstraintNode DataFeedItem DefinedTerm Demand
    DigitalDocumentPermission EducationalOccupationalProgram EnergyConsumptionDetails EntryPoint
    FinancialIncentive FloorPlan GameServer GeospatialGeometry Grant HealthInsurancePlan
    HealthPlanCostSharingSpecification HealthPlanFormulary HealthPlanNetwork Invoice ItemList JobPosting
    Language ListItem MediaSubscription MemberProgram MemberProgramTier MenuItem MerchantReturnPolicy
    MerchantReturnPolicySeasonalOverride Observation Occupation OccupationalExperienceRequirements Offer Order
    OrderItem ParcelDelivery Permit ProgramMembership Property PropertyValueSpecification Quantity Rating
    Reservation Role Schedule Seat Series Service ServiceChannel SpeakableSpecification StatisticalPopulation
    StructuredValue Ticket Trip VirtualLocation
InteractAction: BefriendAction CommunicateAction FollowAction JoinAction LeaveAction MarryAction RegisterAction
    SubscribeAction UnRegisterAction
InvestmentOrDeposit: BrokerageAccount DepositAccount InvestmentFund
ItemList: BreadcrumbList HowToSection HowToStep OfferCatalog
Landform: BodyOfWater Continent Mountain Volcano
LearningResource: Course Quiz Syllabus
LegalService: Attorney Notary
Legislation: LegislationObject
LifestyleModification: Diet PhysicalActivity
ListItem: HowToDirection HowToItem HowToSection HowToStep HowToTip
LoanOrCredit: MortgageLoan
LocalBusiness: AnimalShelter ArchiveOrganization AutomotiveBusiness ChildCare Dentist DryCleaningOrLaundry
    EmergencyService EmploymentAgency EntertainmentBusiness FinancialService FoodEstablishment GovernmentOffice
    HealthAndBeautyBusiness HomeAndConstructionBusiness InternetCafe LegalService Library LodgingBusiness
    MedicalBusiness ProfessionalService RadioStation RealEstateAgent RecyclingCenter SelfStorage ShoppingCenter
    SportsActivityLocation Store TelevisionStation TouristInformationCenter TravelAgency
LodgingBusiness: BedAndBreakfast Campground Hostel Hotel Motel Resort VacationRental
MediaGallery: ImageGallery VideoGallery
MediaObject: 3DModel AmpStory AudioObject DataDownload ImageObject LegislationObject MusicVideoObject TextObject
    VideoObject
MedicalAudience: Patient
MedicalBusiness: Dentist MedicalClinic Optician Pharmacy Physician
MedicalClinic: CovidTestingFacility
MedicalCondition: InfectiousDisease MedicalSignOrSymptom
MedicalEntity: AnatomicalStructure AnatomicalSystem DrugClass DrugCost LifestyleModification MedicalCause
    MedicalCondition MedicalContraindication MedicalDevice MedicalGuideline MedicalIndication MedicalIntangible
    MedicalProcedure MedicalRiskEstimator MedicalRiskFactor MedicalStudy MedicalTest Substance
    SuperficialAnatomy
MedicalGuideline: MedicalGuidelineContraindication MedicalGuidelineRecommendation
MedicalIndication: ApprovedIndication PreventionIndication TreatmentIndication
MedicalIntangible: DDxElement DoseSchedule DrugLegalStatus DrugStrength MedicalCode MedicalConditionStage
MedicalOrganization: Dentist DiagnosticLab Hospital MedicalClinic Pharmacy Physician VeterinaryCare
MedicalProcedure: DiagnosticProcedure PalliativeProcedure SurgicalProcedure TherapeuticProcedure
MedicalRiskEstimator: MedicalRiskCalculator MedicalRiskScore
MedicalSign: VitalSign
MedicalSignOrSymptom: MedicalSign MedicalSymptom
MedicalStudy: MedicalObservationalStudy MedicalTrial
MedicalTest: BloodTest ImagingTest MedicalTestPanel PathologyTest
MedicalTherapy: OccupationalTherapy PalliativeProcedure PhysicalTherapy RadiationTherapy
Message: EmailMessage
MoveAction: ArriveAction DepartAction TravelAction
MusicPlaylist: MusicAlbum MusicRelease
NewsArticle: AnalysisNewsArticle AskPublicNewsArticle BackgroundNewsArticle OpinionNewsArticle
    ReportageNewsArticle ReviewNewsArticle
Offer: AggregateOffer OfferForLease OfferForPurchase
OnlineBusiness: OnlineStore
Organization: Airline Consortium Cooperative Corporation EducationalOrganization FundingScheme
    GovernmentOrganization LibrarySystem LocalBusiness MedicalOrganization NGO NewsMediaOrganization
    OnlineBusiness PerformingGroup PoliticalParty Project ResearchOrganization SearchRescueOrganization
    SportsOrganization WorkersUnion
OrganizationRole: EmployeeRole
OrganizeAction: AllocateAction ApplyAction BookmarkAction PlanAction
PeopleAudience: MedicalAudience ParentAudience
PerformingGroup: DanceGroup MusicGroup TheaterGroup
Periodical: ComicSeries Newspaper
Permit: GovernmentPermit
Person: Patient
PhysicalActivity: ExercisePlan
Physician: IndividualPhysician PhysiciansOffice
Place: Accommodation AdministrativeArea CivicStructure Landform LandmarksOrHistoricalBuildings LocalBusiness
    Residence TouristAttraction TouristDestination
PlaceOfWorship: BuddhistTemple Church HinduTemple Mosque Synagogue
PlanAction: CancelAction ReserveAction ScheduleAction
PlayAction: ExerciseAction PerformAction
PriceSpecification: CompoundPriceSpecification DeliveryChargeSpecification PaymentChargeSpecification
    UnitPriceSpecification
Product: Drug IndividualProduct ProductCollection ProductGroup ProductModel SomeProducts Vehicle
Project: FundingAgency ResearchProject
PropertyValue: LocationFeatureSpecification
PublicationEvent: BroadcastEvent OnDemandEvent
PublicationIssue: ComicIssue
QuantitativeValueDistribution: MonetaryAmountDistribution
Quantity: Distance Duration Energy Mass
RadioChannel: AMRadioChannel FMRadioChannel
Rating: AggregateRating EndorsementRating
ReactAction: AgreeAction DisagreeAction DislikeAction EndorseAction LikeAction WantAction
Reservation: BoatReservation BusReservation EventReservation FlightReservation FoodEstablishmentReservation
    LodgingReservation RentalCarReservation ReservationPackage TaxiReservation TrainReservation
Residence: ApartmentComplex GatedResidenceCommunity
Resort: SkiResort
Review: ClaimReview CriticReview EmployerReview MediaReview Recommendation UserReview
Role: LinkRole OrganizationRole PerformanceRole
Room: HotelRoom MeetingRoom
ScholarlyArticle: MedicalScholarlyArticle
Series: CreativeWorkSeries EventSeries
Service: BroadcastService CableOrSatelliteService FinancialProduct FoodService GovernmentService Taxi
    TaxiService WebAPI
SocialMediaPosting: BlogPosting DiscussionForumPosting
SoftwareApplication: MobileApplication VideoGame WebApplication
SportsActivityLocation: BowlingAlley ExerciseGym GolfCourse HealthClub PublicSwimmingPool SkiResort SportsClub
    StadiumOrArena TennisComplex
SportsOrganization: SportsTeam
Store: AutoPartsStore BikeStore BookStore ClothingStore ComputerStore ConvenienceStore DepartmentStore
    ElectronicsStore Florist FurnitureStore GardenStore GroceryStore HardwareStore HobbyShop HomeGoodsStore
    JewelryStore LiquorStore MensClothingStore MobilePhoneStore MovieRentalStore MusicStore OfficeEquipmentStore
    OutletStore PawnShop PetStore ShoeStore SportingGoodsStore TireShop ToyStore WholesaleStore
StructuredValue: CDCPMDRecord ContactPoint DatedMoneySpecification DefinedRegion DeliveryTimeSettings
    EngineSpecification ExchangeRateSpecification GeoCoordinates GeoShape InteractionCounter MonetaryAmount
    NutritionInformation OfferShippingDetails OpeningHoursSpecification OwnershipInfo
    PostalCodeRangeSpecification PriceSpecification PropertyValue QuantitativeValue
    QuantitativeValueDistribution RepaymentSpecification ServicePeriod ShippingConditions ShippingDeliveryTime
    ShippingRateSettings ShippingService TypeAndQuantityNode WarrantyPromise
Substance: DietarySupplement Drug
TechArticle: APIReference
TherapeuticProcedure: MedicalTherapy PsychologicalTreatment
Thing: Action BioChemEntity CreativeWork Event Intangible MedicalEntity Organization Person Place Product Taxon
TradeAction: BuyAction DonateAction OrderAction PayAction PreOrderAction QuoteAction RentAction SellAction
    TipAction
TransferAction: BorrowAction DonateAction DownloadAction GiveAction LendAction MoneyTransfer ReceiveAction
    ReturnAction SendAction TakeAction
Trip: BoatTrip BusTrip Flight TouristTrip TrainTrip
UpdateAction: AddAction DeleteAction ReplaceAction
UseAction: WearAction
UserInteraction: UserBlocks UserCheckins UserComments UserDownloads UserLikes UserPageVisits UserPlays
    UserPlusOnes UserTweets
Vehicle: BusOrCoach Car Motorcycle MotorizedBicycle
Vessel: Artery LymphaticVessel Vein
VideoObject: VideoObjectSnapshot
VisualArtwork: CoverArt
WebContent: HealthTopicContent
WebPage: AboutPage CheckoutPage CollectionPage ContactPage FAQPage ItemPage MedicalWebPage ProfilePage QAPage
    RealEstateListing SearchResultsPage
WebPageElement: SiteNavigationElement Table WPAdBlock WPFooter WPHeader WPSideBar
"""

# `schema:Event`, `http://schema.org/Event`, `https://www.schema.org/Event/`: the forms seen in the wild.
_SCHEMA_ORG_PREFIX = re.compile(r"^(?:schema:|https?://(?:www\.)?schema\.org/)", re.IGNORECASE)


def _parse_tree(text: str) -> dict[str, tuple[str, ...]]:
    children: dict[str, tuple[str, ...]] = {}
    for entry in re.split(r"\n(?=\S)", text.strip()):
        parent, _, names = entry.partition(":")
        children[parent] = tuple(names.split())
    return children


_CHILDREN = _parse_tree(_TREE)
_CANONICAL = {name.casefold(): name for name in (*_CHILDREN, *(c for cs in _CHILDREN.values() for c in cs))}


def schema_org_name(raw_type: str) -> str | None:
    """The bare schema.org class name of an `@type` value, or None when it names another vocabulary.

    Prefixes are dropped and case is forgiven (`schema:musicevent` → `MusicEvent`), as publishers do both.
    """
    name = _SCHEMA_ORG_PREFIX.sub("", raw_type.strip()).rstrip("/")
    if not name or ":" in name or "/" in name:
        return None
    return _CANONICAL.get(name.casefold(), name)


@cache
def _with_subtypes(name: str) -> frozenset[str]:
    found = {name}
    pending = [name]
    while pending:
        for child in _CHILDREN.get(pending.pop(), ()):
            if child not in found:
                found.add(child)
                pending.append(child)
    return frozenset(found)


def with_subtypes(types: Iterable[str]) -> frozenset[str]:
    """The asked types and all their schema.org subtypes, as case-folded names for matching."""
    names: set[str] = set()
    for raw_type in types:
        name = schema_org_name(raw_type)
        if name is not None:
            names.update(sub.casefold() for sub in _with_subtypes(name))
    return frozenset(names)


def is_of_type(type_value: object, wanted: frozenset[str]) -> bool:
    """Whether an item's `@type` (a string or a list of them) names one of `wanted` (from `with_subtypes`)."""
    raw_types = type_value if isinstance(type_value, list) else [type_value]
    for raw_type in raw_types:
        if isinstance(raw_type, str):
            name = schema_org_name(raw_type)
            if name is not None and name.casefold() in wanted:
                return True
    return False
